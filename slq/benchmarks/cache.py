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
        # The checkpoint holds only what trained (nothing at all for zero-shot), so the frozen
        # backbone it runs on is part of the key too.
        backbone = getattr(encoder, "backbone", None)
        self.backbone_hash = backbone_fingerprint(backbone, self.dir) if backbone is not None else None
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
        blob = json.dumps([self.checkpoint_hash, self.backbone_hash, corpus.kind, prompt, corpus.data_hash, items],
                          sort_keys=True)
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


def backbone_fingerprint(backbone, cache_dir: Path) -> str:
    """Content hash of a local backbone folder's files (weights, config, tokenizer, processor).

    A file's sha256 is remembered in `cache_dir/backbone_files.json` by (path, size, mtime), so a
    multi-GB checkpoint is read once, not on every evaluation. A backbone that is not a local
    folder is identified by its name and revision.
    """
    root = Path(str(backbone.source))
    if not root.is_dir():
        return hashlib.sha256(f"{backbone.source}@{backbone.revision}".encode()).hexdigest()[:16]
    from slq.io import file_sha256, write_json_atomic

    memo_path = Path(cache_dir) / "backbone_files.json"
    try:
        memo = json.loads(memo_path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        memo = {}
    parts, changed = [], False
    for f in sorted(p for p in root.iterdir() if p.is_file()):
        st = f.stat()
        tag = f"{f.resolve()}|{st.st_size}|{st.st_mtime_ns}"
        if tag not in memo:
            memo[tag], changed = file_sha256(f), True
        parts.append(f"{f.name}:{memo[tag]}")
    if changed:
        write_json_atomic(memo_path, memo)
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]

