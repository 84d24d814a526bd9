"""Atomic writes and content hashes, shared by every stage.

A reader (DVC, the next stage, a user) sees the old file or folder or the new one, never half
of one: everything is written to a temporary sibling and renamed into place.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_file_atomic(path: str | Path, write_fn) -> Path:
    """Call write_fn(f) on an open binary file beside `path`, then rename it into place (0644);
    on any error the temporary file is removed and `path` is as it was. For data too large to
    hold in memory (a copy streamed from an archive)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write_fn(f)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_bytes_atomic(path: str | Path, data: bytes) -> Path:
    return write_file_atomic(path, lambda f: f.write(data))


def write_text_atomic(path: str | Path, text: str) -> Path:
    return write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: str | Path, obj) -> Path:
    return write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def write_csv_atomic(path: str | Path, rows: list[dict], fieldnames: list[str]) -> Path:
    """Rows as CSV with a header, written whole or not at all (e.g. a per-step history)."""
    import csv
    import io

    buf = io.StringIO(newline="")
    w = csv.DictWriter(buf, fieldnames=fieldnames)
    w.writeheader()
    w.writerows(rows)
    return write_text_atomic(path, buf.getvalue())


def write_atomic_dir(out_dir: str | Path, write_fn) -> Path:
    """Call write_fn(tmp_dir) on a fresh sibling folder, then swap it in for out_dir."""
    with staged_dir(out_dir) as tmp:
        write_fn(tmp)
    return Path(out_dir)


@contextlib.contextmanager
def staged_dir(out_dir: str | Path, copy: bool = False):
    """A fresh sibling folder to build `out_dir` in, swapped in for it when the block ends normally
    and removed when the block raises (`out_dir` is then as it was). With `copy`, the folder starts
    as a copy of out_dir's files: for a store that updates its folder in place (LanceDB)."""
    out_dir = Path(out_dir)
    for attempt in range(3):  # another process may remove the parent between these if it is empty (a tidy-up)
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        try:
            tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
            break
        except FileNotFoundError:
            if attempt == 2:
                raise
    os.chmod(tmp, 0o755)  # mkdtemp makes 0700 folders
    try:
        if copy and out_dir.is_dir():
            shutil.copytree(out_dir, tmp, symlinks=True, dirs_exist_ok=True)
        yield tmp
        replace_dir(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def replace_dir(src: str | Path, out_dir: str | Path) -> Path:
    """Swap the finished folder `src` (a sibling of `out_dir`: one filesystem) in for `out_dir`;
    the old folder is moved aside first and removed once the new one is in place."""
    src, out_dir = Path(src), Path(out_dir)
    old = None
    if out_dir.exists() or out_dir.is_symlink():
        old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
        os.replace(out_dir, old)
    os.replace(src, out_dir)
    if old is not None:
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink(missing_ok=True)
    return out_dir


class Snapshot:
    """What some files and folders hold now, kept until `restore` puts them back (a path that did not
    exist is removed again) or `discard` drops the copy: how a failed stage leaves its outputs as
    they were, however far it got. The copy is hard links beside each path (a byte copy where a link
    cannot be made), so it costs no space: safe because slq's writers replace a file (write_*_atomic,
    write_atomic_dir) and never write into one, so a linked file keeps its old bytes. (A library
    that rewrites its files in place, LanceDB's store, works in a copy instead: the index stage.)"""

    def __init__(self, paths):
        self._kept: dict[Path, tuple[Path, Path] | None] = {}
        self._stat: dict[Path, tuple | None] = {}
        for p in dict.fromkeys(Path(x) for x in paths):
            self._stat[p] = _identity(p)
            if self._stat[p] is None:
                self._kept[p] = None
                continue
            holder = Path(tempfile.mkdtemp(prefix=f".{p.name}.keep-", dir=p.parent))
            if p.is_dir() and not p.is_symlink():
                shutil.copytree(p, holder / p.name, symlinks=True, copy_function=_link_or_copy)
            else:
                _link_or_copy(p, holder / p.name)
            self._kept[p] = (holder, holder / p.name)

    @property
    def paths(self) -> list[Path]:
        return list(self._kept)

    def replaced(self, path: str | Path) -> bool:
        """Whether `path` is now another file or folder than when the snapshot was taken (written,
        created or removed since). While the snapshot holds the old inode, no new file can reuse it."""
        p = Path(path)
        return _identity(p) != self._stat[p]

    def restore(self, paths=None) -> None:
        """Put each path (default every one) back as it was; the copies of the others are kept."""
        for p in [Path(x) for x in paths] if paths is not None else self.paths:
            kept = self._kept.pop(p)
            if kept is None:
                _remove(p)
                continue
            holder, copy = kept
            if copy.is_dir() and not copy.is_symlink():
                replace_dir(copy, p)
            else:
                os.replace(copy, p)
            shutil.rmtree(holder, ignore_errors=True)

    def discard(self) -> None:
        """Drop the copies: what the paths hold now stays."""
        for kept in self._kept.values():
            if kept is not None:
                shutil.rmtree(kept[0], ignore_errors=True)
        self._kept.clear()


@contextlib.contextmanager
def restored_on_failure(paths):
    """Run the block; if it raises (or is interrupted), every path goes back to what it held before
    (`Snapshot`). The exception propagates."""
    snap = Snapshot(paths)
    try:
        yield snap
    except BaseException:
        snap.restore()
        raise
    else:
        snap.discard()


def _identity(p: Path) -> tuple | None:
    try:
        st = p.lstat()
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size


def _link_or_copy(src, dst):
    if os.path.islink(src):
        os.symlink(os.readlink(src), dst)
        return dst
    try:
        os.link(src, dst)
    except OSError:  # no hard links here (another filesystem kind): a byte copy
        shutil.copy2(src, dst)
    return dst


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p)
    elif p.exists() or p.is_symlink():
        p.unlink()


def tidy_atomic_dir(out_dir: str | Path) -> None:
    """Tidy what a killed `write_atomic_dir(out_dir)` left beside `out_dir`: its unfinished temporary
    folders go; a previous version set aside (`.<name>.old-<pid>`) goes too, or is put back when the
    kill fell between the two renames and `out_dir` is missing. Not while another process writes it."""
    out_dir = Path(out_dir)
    if not out_dir.parent.is_dir():
        return
    olds = sorted(out_dir.parent.glob(f".{out_dir.name}.old-*"), key=lambda p: p.stat().st_mtime)
    if olds and not out_dir.exists():
        os.replace(olds.pop(), out_dir)
    for p in [*out_dir.parent.glob(f".{out_dir.name}.tmp-*"), *olds]:
        shutil.rmtree(p, ignore_errors=True)
