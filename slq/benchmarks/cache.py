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
        self.hits = self.misses = 0

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
        self.dir.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.dir, suffix=".npy")
        os.close(fd)
        np.save(tmp, out)
        os.replace(tmp, path)
        return out
