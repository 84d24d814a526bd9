"""The corpus package's one error type: what the user must fix, naming the item or table."""

from __future__ import annotations


class CorpusError(ValueError):
    """A bad manifest row, an item that cannot be embedded, a table that belongs to another
    checkpoint, a missing checkpoint: the message names the id, path or URI and what to do."""
