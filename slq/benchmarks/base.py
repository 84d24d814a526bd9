"""The benchmark contract.

A benchmark reads a real dataset's own files from a local folder (never downloads), checks them
(missing files, duplicate ids, dangling references, unreadable images are reported with counts
and examples), says what must be embedded (`Corpus`), and turns embeddings into metrics.
Embedding goes through an `embedder` (see `slq.benchmarks.cache.CachedEmbedder`) so a corpus is
embedded once per (checkpoint, data, prompt) and re-scoring never re-embeds.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

BENCHMARKS: dict[str, type[Benchmark]] = {}


class MissingData(FileNotFoundError):
    """Expected dataset files are absent; the message names them and where they should be."""


class DataError(ValueError):
    """The dataset's files are inconsistent (duplicates, dangling references, unreadable images)."""


def register_benchmark(name: str):
    def wrap(cls):
        if name in BENCHMARKS and BENCHMARKS[name] is not cls:
            raise RuntimeError(f"benchmark {name!r} registered twice")
        BENCHMARKS[name] = cls
        cls.name = name
        return cls

    return wrap


def get_benchmark(name: str) -> type[Benchmark]:
    from slq.benchmarks import load_all

    load_all()
    try:
        return BENCHMARKS[name]
    except KeyError:
        raise ValueError(f"unknown benchmark {name!r}; registered: {', '.join(sorted(BENCHMARKS))}") from None


@dataclass
class Corpus:
    """Items to embed: texts (str), images (path), or multimodal ((path, str)) with one prompt."""

    kind: str  # "text" | "image" | "multimodal"
    items: list
    prompt: dict | None = None  # Prompts fields ({"text": ..., "image": ..., "multimodal": ...})
    data_hash: str = ""  # hash of the files the items came from (part of the cache key)


class Embedder(Protocol):
    def embed(self, corpus: Corpus) -> np.ndarray:  # (N, D) float32, L2-normalised
        ...


@dataclass
class Result:
    metrics: dict[str, float]
    curves: dict[str, list[float]] = field(default_factory=dict)  # name -> recall at k = 1..K
    info: dict[str, Any] = field(default_factory=dict)  # counts, files and hashes, prompts, partial flag


def files_hash(paths) -> str:
    """Content hash of the annotation files a benchmark read (recorded with its results)."""
    h = hashlib.sha256()
    for p in sorted(Path(p) for p in paths):
        h.update(p.name.encode())
        h.update(hashlib.sha256(p.read_bytes()).digest())
    return h.hexdigest()[:16]


def require(root: Path, relpaths, what: str) -> list[Path]:
    """The files, or MissingData naming every absent one and the folder they belong in."""
    paths = [root / r for r in relpaths]
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        raise MissingData(
            f"{what}: expected file(s) not found under {root}: {', '.join(missing)}. "
            "Point this benchmark's `root` in params.yaml at a local copy laid out as in docs/benchmarks-data.md."
        )
    return paths


class Benchmark:
    """One benchmark. `options` come from its entry in params.yaml (`evaluate.benchmarks`)."""

    name: str = ""
    paper: dict[str, float] = {}  # metric -> the paper's reported value (percent), where it has one
    prompts: dict[str, dict] = {}  # role -> Prompts fields; overridable via options["prompts"]

    def __init__(self, root: str | Path | None = None, partial: bool = False, **options):
        self.root = Path(root) if root is not None else None
        self.partial = partial  # run on the present part of a partial copy (flagged in every output)
        self.options = options
        self.prompts = {**type(self).prompts, **options.get("prompts", {})}

    def evaluate(self, embedder: Embedder, ks=(1, 5, 10)) -> Result:
        raise NotImplementedError
