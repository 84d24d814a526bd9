"""DVC's bookkeeping for stages run outside `dvc repro` (the Prefect flow): skip, run, record.

`dvc repro` decides whether a stage runs by DVC's own hashes of its deps, params and outs, and
records the result in dvc.lock. The flow runs the same stage functions in its own process, so to
mean the same thing it asks DVC the same question first (`Repo.status` of that one stage: empty
means up to date, skip it) and, after running a stage, records it as `dvc repro` would
(`Repo.commit`: the outputs go to the cache, their hashes to dvc.lock). After a flow run,
`dvc status` is clean and the next `dvc repro` (or flow run) reruns nothing.

Like `dvc repro`, the flow pins the data source only once validation passed: the .dvc file of
`data.root` is committed after the validate stage succeeds, never before (dvc repro rewrites it
first; the validate stage puts it back when validation fails, see slq.mlops.stages.validate).

The same module keeps the rest of slq's DVC and git bookkeeping: the data pin a failed validation
puts back (`restore_pin`) and the git commit a run records.

DVC is imported inside the functions: the training and embedding code never needs it.
"""

from __future__ import annotations

import contextlib
import subprocess
from pathlib import Path

from slq.mlops.config import Config


def dvc_root(cfg: Config) -> Path | None:
    """The project folder when it is a DVC project with a dvc.yaml, else None."""
    root = Path(cfg.root).resolve()
    return root if (root / "dvc.yaml").is_file() and (root / ".dvc").is_dir() else None


def tracked(cfg: Config, params_file: str | Path | None, overrides: dict | None) -> str | None:
    """Why DVC cannot describe this run (None when it can): the stages read params.yaml of the
    project, so another params file or unapplied overrides mean DVC's hashes are not this run's."""
    root = dvc_root(cfg)
    if root is None:
        return f"{cfg.root} is not a DVC project (no dvc.yaml and .dvc/)"
    if params_file is not None and Path(params_file).resolve() != root / "params.yaml":
        return f"the params file {params_file} is not the project's params.yaml, which dvc.yaml reads"
    if overrides:
        return "overrides were given and not written to params.yaml"
    return None


@contextlib.contextmanager
def _repo(root: Path):
    from dvc.repo import Repo

    with contextlib.chdir(root):  # DVC resolves some output paths against the working directory
        repo = Repo(str(root))
        try:
            yield repo
        finally:
            repo.close()


def up_to_date(cfg: Config, stage: str) -> bool:
    """Whether DVC would skip `stage` now: its deps, params and outs match dvc.lock."""
    root = dvc_root(cfg)
    with _repo(root) as repo:
        return not repo.status(targets=[stage])


def record(cfg: Config, stage: str) -> None:
    """Record a stage that just ran as `dvc repro` would: outputs cached, hashes into dvc.lock."""
    root = dvc_root(cfg)
    with _repo(root) as repo:
        repo.commit(stage, force=True)


def pin_data(cfg: Config) -> list[str]:
    """After validation passed: commit the .dvc file(s) of `data.root` that no longer match the
    data (what `dvc repro` does before running anything). Returns the files committed."""
    root = dvc_root(cfg)
    data = cfg.path(cfg.data.root).resolve()
    committed = []
    with _repo(root) as repo:
        for stage in repo.index.stages:
            if stage.is_data_source and any(Path(o.fs_path).resolve() == data for o in stage.outs):
                rel = Path(stage.path).resolve().relative_to(root).as_posix()
                if repo.status(targets=[rel]):
                    repo.commit(rel, force=True)
                    committed.append(rel)
    return committed


def apply_overrides(params_file: Path, overrides: dict) -> None:
    """Write `{"train.steps": 50}` into params.yaml keeping its comments, as `dvc exp run -S`
    does, so DVC's hashes describe what the flow runs."""
    from dvc.utils.serialize import modify_yaml

    with modify_yaml(str(params_file)) as doc:
        for key, value in overrides.items():
            node = doc
            *parents, last = key.split(".")
            for p in parents:
                node = node.setdefault(p, {})
            node[last] = value


def git_commit(root: str | Path) -> str:
    """HEAD of the project's git repository, or "unknown" (no git, not a repo, no commit)."""
    try:
        res = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return res.stdout.strip() if res.returncode == 0 and res.stdout.strip() else "unknown"


PIN_KEYS = ("md5", "size", "nfiles", "hash")


def restore_pin(cfg: Config) -> str | None:
    """Put the .dvc file that tracks `data.root` back on the data that last passed validation.

    `dvc repro` re-hashes a changed data source and rewrites its .dvc file *before* any stage runs,
    so without this a failed validation would leave data.dvc pinning the bad data. The last good
    pin is the one dvc.lock records for this stage's dependency (written only when validation
    passed). The DVC cache still holds that data: `dvc checkout <file>` brings it back.
    Returns what was done, or None when there was nothing to restore.
    """
    import yaml

    root = Path(cfg.root).resolve()
    data = cfg.path(cfg.data.root).resolve()
    try:
        rel = data.relative_to(root).as_posix()
    except ValueError:
        return None
    good = _locked_dep(root / "dvc.lock", rel)
    if good is None:
        return None
    for dvc_file in sorted(set(root.glob("*.dvc")) | set(data.parent.glob("*.dvc"))):
        try:
            doc = yaml.safe_load(dvc_file.read_text())
        except (OSError, yaml.YAMLError):
            continue
        outs = doc.get("outs") if isinstance(doc, dict) else None
        for out in outs or []:
            if (dvc_file.parent / str(out.get("path", ""))).resolve() != data:
                continue
            if all(out.get(k) == good.get(k) for k in PIN_KEYS if k in good):
                return None
            out.update({k: good[k] for k in PIN_KEYS if k in good})
            from slq.io import write_text_atomic

            write_text_atomic(dvc_file, yaml.safe_dump(doc, sort_keys=False))
            return (f"{dvc_file.name} restored to the last validated data ({good.get('md5')}); the data in "
                    f"{cfg.data.root} is NOT pinned. Fix it and rerun, or `dvc checkout {dvc_file.name}` to get "
                    "the validated data back.")
    return None


def _locked_dep(lock: Path, rel: str) -> dict | None:
    """The validate stage's recorded hash of the dependency at `rel` in dvc.lock, if any."""
    import yaml

    try:
        stages = (yaml.safe_load(lock.read_text()) or {}).get("stages", {})
    except (OSError, yaml.YAMLError):
        return None
    for dep in (stages.get("validate") or {}).get("deps", []):
        if dep.get("path") == rel:
            return dep
    return None
