"""`slq`: the backbone frozen; shared latent queries appended to every input; the mean of their
last hidden states. Trains the queries (+ temperature)."""

from __future__ import annotations

from slq.methods.base import MethodEncoder, register_method


@register_method("slq")
class SLQ(MethodEncoder):
    """SLQ itself (`slq.encoder.SLQEncoder`'s behaviour, registered): the queries train, the LLM
    never does, so the prompt's states do not depend on what trains and the split forward is exact."""

    poolings = ("queries",)
    split_exact = True
    reference = True  # the train stage's method; the methods stage runs the others beside it
