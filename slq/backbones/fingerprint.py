"""A content fingerprint of a backbone: what its weights and config are, not where they lie.

Trained queries belong to one backbone. Two fine-tunes of the same architecture share
model_type, hidden size and tensor shapes, so only the weights' bytes tell them apart. The
fingerprint hashes every tensor of the folder's safetensors files by name (so re-sharding the
same weights keeps it), plus config.json without the keys that change on a mere re-save.
Other weight formats (.bin, .pt) are hashed file by file.

A multi-GB checkpoint is read once: each file's hashes are remembered by (path, size, mtime) in
`$SLQ_CACHE_DIR/backbone_fingerprints.json` (default ~/.cache/slq).
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path

from slq.io import file_sha256, write_json_atomic

# config.json keys that do not change what the model computes (the storage dtype is in each tensor's hash)
VOLATILE_CONFIG_KEYS = ("_name_or_path", "transformers_version", "_commit_hash", "architectures", "torch_dtype",
                        "dtype")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
_CHUNK = 1 << 22


def cache_dir() -> Path:
    return Path(os.environ.get("SLQ_CACHE_DIR") or Path.home() / ".cache" / "slq")


def _canonical_config(cfg: dict) -> dict:
    out = {}
    for k, v in cfg.items():
        if k in VOLATILE_CONFIG_KEYS:
            continue
        out[k] = _canonical_config(v) if isinstance(v, dict) else v
    return out


def _safetensors_tensors(path: Path) -> dict[str, str]:
    """{tensor name: "dtype|shape|sha256 of its bytes"} read straight from the file."""
    out = {}
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
        base = 8 + n
        for name in sorted(k for k in header if k != "__metadata__"):
            meta = header[name]
            start, end = meta["data_offsets"]
            f.seek(base + start)
            h, left = hashlib.sha256(), end - start
            while left:
                block = f.read(min(_CHUNK, left))
                if not block:
                    raise ValueError(f"{path}: tensor {name} runs past the end of the file (truncated download?)")
                h.update(block)
                left -= len(block)
            out[name] = f"{meta['dtype']}|{meta['shape']}|{h.hexdigest()}"
    return out


def backbone_fingerprint(folder: str | Path, *, memo: bool = True) -> str:
    """16 hex digits identifying a local backbone folder's weights and config.

    A name that is not a local folder (a hub id) is identified by the name itself.
    """
    root = Path(str(folder))
    if not root.is_dir():
        return hashlib.sha256(f"name:{folder}".encode()).hexdigest()[:16]
    memo_path = cache_dir() / "backbone_fingerprints.json"
    known: dict = {}
    if memo:
        try:
            known = json.loads(memo_path.read_text())
        except (FileNotFoundError, json.JSONDecodeError, OSError):
            known = {}
    parts: list[str] = []
    cfg = root / "config.json"
    if cfg.is_file():
        parts.append("config:" + json.dumps(_canonical_config(json.loads(cfg.read_text())), sort_keys=True))
    changed = False
    tensors: dict[str, str] = {}
    for f in sorted(p for p in root.iterdir() if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES)):
        st = f.stat()
        tag = f"{f.resolve()}|{st.st_size}|{st.st_mtime_ns}"
        if tag not in known:
            known[tag] = (_safetensors_tensors(f) if f.suffix == ".safetensors"
                          else {f"file:{f.name}": file_sha256(f)})
            changed = True
        tensors.update(known[tag])
    if not tensors:
        raise ValueError(f"backbone folder {root} holds no weight files ({', '.join(WEIGHT_SUFFIXES)})")
    parts += [f"{k}={v}" for k, v in sorted(tensors.items())]
    if memo and changed:
        try:
            write_json_atomic(memo_path, known)
        except OSError:  # a read-only home: the fingerprint is still right, only slower next time
            pass
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]
