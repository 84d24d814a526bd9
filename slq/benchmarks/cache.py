"""Embeddings computed once per (checkpoint, data, prompt, items) and kept on disk."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import numpy as np

from slq.benchmarks.base import Corpus


class CachedEmbedder:
    def __init__(self, encoder, cache_dir: str | Path, checkpoint_hash: str, batch_size: int = 32):
        self.encoder = encoder
        self.dir = Path(cache_dir)
        self.checkpoint_hash = checkpoint_hash
        self.batch_size = batch_size
        self.hits = self.misses = self.reused = 0
        self.known: dict[tuple, np.ndarray] = {}  # (kind, prompt, item) -> a vector embedded elsewhere

    def prefill(self, kind: str, items, vectors: np.ndarray, prompt: dict) -> None:
        """Vectors already embedded (the embed stage's) by this checkpoint with `prompt`: a corpus
        made only of such items is assembled from them instead of being embedded again."""
        if len(items) != len(vectors):
            raise ValueError(f"prefill: {len(items)} items but {len(vectors)} vectors")
        tag = json.dumps(prompt, sort_keys=True)
        for item, vec in zip(items, vectors):
            self.known[(kind, tag, _item_key(kind, item))] = vec

    def _from_known(self, corpus: Corpus) -> np.ndarray | None:
        if corpus.kind not in ("image", "text") or not self.known:
            return None
        tag = json.dumps(self.effective_prompt(corpus), sort_keys=True)
        rows = [self.known.get((corpus.kind, tag, _item_key(corpus.kind, it))) for it in corpus.items]
        if not rows or any(r is None for r in rows):
            return None
        return np.stack(rows)

    def key(self, corpus: Corpus) -> str:
        items = [[str(x) for x in it] if isinstance(it, (tuple, list)) else str(it) for it in corpus.items]
        prompt = self.effective_prompt(corpus)  # what the items are really embedded with
        blob = json.dumps([self.checkpoint_hash, corpus.kind, prompt, corpus.data_hash, items], sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:24]

    def effective_prompt(self, corpus: Corpus) -> dict:
        """The encoder's prompts with the corpus's fields on top."""
        return {**self.encoder.prompts.to_dict(), **(corpus.prompt or {})}

    def embed(self, corpus: Corpus) -> np.ndarray:
        path = self.dir / f"{self.key(corpus)}.npy"
        if path.exists():
            self.hits += 1
            return np.load(path)
        self.misses += 1
        out = self._from_known(corpus)
        if out is not None:
            self.reused += 1
            self._save(path, out)
            return out
        enc, bs = self.encoder, self.batch_size
        with enc.using_prompts(self.effective_prompt(corpus)):
            if corpus.kind == "text":
                out = enc.encode_text(corpus.items, batch_size=bs)
            elif corpus.kind == "image":
                out = enc.encode_image(corpus.items, batch_size=bs)
            elif corpus.kind == "multimodal":
                out = enc.encode_multimodal(corpus.items, batch_size=bs)
            else:
                raise ValueError(f"unknown corpus kind {corpus.kind!r}")
        self._save(path, out)
        return out

    def _save(self, path: Path, out: np.ndarray) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.dir, suffix=".npy")
        os.close(fd)
        np.save(tmp, out)
        os.replace(tmp, path)


def _item_key(kind: str, item) -> str:
    """An item as a lookup key: image paths resolved, so relative and absolute spellings agree."""
    if kind == "image" and isinstance(item, (str, Path)):
        return str(Path(item).resolve())
    return str(item)
