"""The train stage under torchrun: `torchrun --nproc_per_node=2 cli.py stage train` (gloo on CPU).

Rank 0 alone writes the checkpoint, the metrics and the history and removes the resume folder; 2
ranks x batch B end with the queries of 1 process x 2B; a resume on 2 ranks picks up a 1-process
run's state (same global batch); a missing backbone is an error on every rank (no hang). And the
helpers' "rank 0 does it, the others wait" logic, under a 2-rank gloo group.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
B = 4  # per-rank batch; the single process gets 2B
STEPS = 3
TIMEOUT = 240


def _env() -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "TQDM_DISABLE": "1", "PYTHONPATH": str(REPO)}
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


def _torchrun() -> list[str]:
    exe = Path(sys.executable).with_name("torchrun")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "torch.distributed.run"]


def _sets(tag: str, batch: int) -> dict:
    """The params overrides of a run with its outputs under <tag>/."""
    return {"train.batch_size": batch, "train.out": f"{tag}/ckpt", "train.work_dir": f"{tag}/work",
            "train.metrics": f"{tag}/metrics/train.json", "train.history": f"{tag}/metrics/history.csv"}


def _stage(params: Path, tag: str, batch: int, ranks: int = 0, extra: tuple = ()) -> subprocess.CompletedProcess:
    """`cli.py stage train` with its outputs under <tag>/; ranks=0: a plain process, else torchrun."""
    args = [str(REPO / "cli.py"), "stage", "train", "-p", str(params)]
    for k, v in _sets(tag, batch).items():
        args += ["--set", f"{k}={v}"]
    args += list(extra)
    # --tee 3: every line of rank r's stdout and stderr comes prefixed with [default<r>]:
    launch = (_torchrun() + ["--standalone", f"--nproc_per_node={ranks}", "--tee", "3"]) if ranks else [sys.executable]
    # a run past TIMEOUT is stopped with its ranks: SIGTERM, which torchrun passes on to them (they run
    # in sessions of their own; a SIGKILL of torchrun alone would leave them waiting in a collective,
    # on the cores the rest of the suite needs)
    proc = subprocess.Popen(launch + args, cwd=params.parent, env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)
        try:
            out, err = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
        pytest.fail(f"{' '.join(launch + args)} ran past {TIMEOUT} s (stopped, with its ranks)\n{out[-3000:]}\n{err[-3000:]}")
    return subprocess.CompletedProcess(launch + args, proc.returncode, out, err)


def _ok(res: subprocess.CompletedProcess):
    assert res.returncode == 0, f"rc {res.returncode}\n{res.stdout[-4000:]}\n{res.stderr[-6000:]}"
    return res


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A tiny world (32 training pairs) and a tiny random backbone (your own: backbone.builtin false)."""
    from slq.miniature.tiny import build_tiny_backbone
    from slq.mlops.config import DataConfig
    from slq.miniature.world import generate_world

    root = tmp_path_factory.mktemp("torchrun")
    data = {"root": "data/world", "n_train": 16, "n_val": 2, "n_test": 2, "image_size": 64}
    generate_world(DataConfig(**data), root / "data/world")
    backbone = build_tiny_backbone("qwen2_vl", root / "backbone")
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["data"].update(data, builtin=False)
    params["backbone"].update(path=str(backbone), builtin=False, dtype="float32", device="cpu")
    params["train"].update(steps=STEPS, num_queries=4, lr=0.05, warmup_steps=1, save_every=1, seed=3)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return root / "params.yaml"


@pytest.fixture(scope="module")
def single(project):
    """The reference: one process, batch 2B."""
    _ok(_stage(project, "single", 2 * B))
    return project.parent / "single"


def _checkpoint(folder: Path):
    from slq.checkpoint import load_checkpoint

    q, log_temp, manifest = load_checkpoint(folder / "ckpt")
    return q, log_temp, manifest


def _check_outputs(tag_dir: Path, single_dir: Path) -> dict:
    """The 2-rank outputs: written once, whole, equal to the single process's; the work folder gone."""
    q, lt, manifest = _checkpoint(tag_dir)
    q1, lt1, _ = _checkpoint(single_dir)
    assert (q - q1).abs().max() < 1e-5 and abs(float(lt) - float(lt1)) < 1e-5
    assert manifest["training"]["world_size"] == 2 and manifest["training"]["batch_size"] == B
    metrics = json.loads((tag_dir / "metrics/train.json").read_text())
    assert metrics["steps"] == STEPS and metrics["world_size"] == 2 and metrics["checkpoint_hash"]
    assert sorted(p.name for p in (tag_dir / "metrics").iterdir()) == ["history.csv", "train.json"]  # no temp files
    assert len((tag_dir / "metrics/history.csv").read_text().splitlines()) == 1 + STEPS
    # no .ckpt.old-* / tmp; the run's resume folder was removed, and train.work_dir with it (left empty)
    assert sorted(p.name for p in tag_dir.iterdir()) == ["ckpt", "metrics"]
    return metrics


def test_two_ranks_write_once_and_match_one_process(project, single):
    t0 = time.perf_counter()
    res = _ok(_stage(project, "ddp", B, ranks=2))
    print(f"torchrun 2 ranks: {time.perf_counter() - t0:.1f} s")
    metrics = _check_outputs(project.parent / "ddp", single)
    assert metrics["resumed_from"] == 0
    assert res.stdout.count('"checkpoint_hash"') == 1  # the result is printed by rank 0 only
    assert "[default0]:" in res.stdout + res.stderr and "[default1]:" not in res.stdout + res.stderr  # rank 1 is quiet
    single_metrics = json.loads((single / "metrics/train.json").read_text())
    assert "world_size" not in single_metrics and single_metrics["steps"] == STEPS


def test_two_ranks_resume_a_one_process_run(project, single):
    """A run killed after step 2 on 1 process x 2B resumes on 2 ranks x B (same global batch)."""
    from slq.mlops.config import load_config
    from slq.mlops.training import fit_config, work_folder
    from slq.mlops.models import load_encoder
    from slq.mlops.datasets import split_rows
    from slq.train import fit

    tag = "resumed"
    cfg = load_config(project, _sets(tag, 2 * B))
    enc = load_encoder(cfg)
    root = cfg.path(cfg.data.root)
    data = [{"image": root / r["image"], "caption": r["caption"], "id": r["id"]} for r in split_rows(cfg, "train")]
    work = work_folder(cfg, "slq", cfg.train.lr, str(enc.backbone.source))
    fit(enc, data, fit_config(cfg, cfg.train.lr), work, progress=False, stop_after=2)
    assert (work / "last" / "train_state.pt").is_file()

    _ok(_stage(project, tag, B, ranks=2))
    metrics = _check_outputs(project.parent / tag, single)
    assert metrics["resumed_from"] == 2


def test_missing_backbone_is_an_error_on_every_rank(project):
    t0 = time.perf_counter()
    res = _stage(project, "nobackbone", B, ranks=2, extra=("--set", "backbone.path=no/such/backbone"))
    out = res.stdout + res.stderr
    assert res.returncode != 0
    flat = " ".join(out.split())
    # each rank says what is wrong: the ranks agree on the failed check, and none exits before all have
    # printed (torchrun may still SIGTERM a rank that is shutting down after it printed: harmless)
    for rank in (0, 1):
        assert f"rank {rank}: stage train: backbone directory" in flat, out[-3000:]
    assert time.perf_counter() - t0 < 60
    assert not (project.parent / "nobackbone").exists()


def test_methods_stage_still_trains_baselines_in_one_process(project):
    """The methods stage goes through the same train_method: in one process no group is made."""
    from slq.mlops.config import load_config
    from slq.mlops.baselines import train_and_score
    from slq.mlops.evaluation import method_benchmarks

    cfg = load_config(project, {**_sets("methods", 2 * B), "methods.out": "methods/out",
                                "methods.metrics": "methods/metrics", "evaluate.cache_dir": "methods/cache"})
    for method in ("zero_shot", "lora"):
        m = train_and_score(cfg, method)
        assert m["budget"]["steps"] == (0 if method == "zero_shot" else STEPS) and "world_size" not in m["budget"]
        assert set(m["benchmarks"]) == set(method_benchmarks(cfg))  # your own data: its own task, `data`
        assert set(m["benchmarks"]) == {"data"}
        assert (project.parent / "methods/out" / method / "slq.json").is_file()
    assert not torch.distributed.is_initialized()
    assert not (project.parent / "methods/work").exists() or not any((project.parent / "methods/work").iterdir())


# ---- the helpers under a 2-rank gloo group (torch.multiprocessing spawn) -------------------------
def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _make(out: str):
    """A fake backbone maker: slow, counts its calls, leaves a file."""
    time.sleep(1.0)
    with open(os.path.join(out, "calls.txt"), "a") as f:
        f.write(f"{os.environ['RANK']}\n")
    Path(out, "made").write_text("ok")
    return {"made": True}


def _fail_on_rank0():
    raise ValueError("no scene file")


def _helpers_worker(rank: int, world: int, port: int, out: str) -> None:
    from slq.distributed import RankZeroFailed, RanksDisagree, agree, distributed_from_env, on_rank_zero

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    seen = {}
    with distributed_from_env():
        assert torch.distributed.is_initialized()
        seen["value"] = on_rank_zero(lambda: _make(out), "make it")
        seen["made_when_returned"] = Path(out, "made").exists()
        try:
            on_rank_zero(_fail_on_rank0, "make it")
        except (ValueError, RankZeroFailed) as e:
            seen["error"] = f"{type(e).__name__}: {e}"
        seen["agreed"] = agree(("last", 10), "the state")
        try:
            agree(rank, "the rank")
        except RanksDisagree as e:
            seen["disagree"] = str(e)
    seen["torn_down"] = not torch.distributed.is_initialized()
    Path(out, f"rank{rank}.json").write_text(json.dumps(seen))


def test_rank_zero_does_it_once_and_the_others_wait(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_helpers_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True, start_method="spawn")
    assert (tmp_path / "calls.txt").read_text().split() == ["0"]  # made once, by rank 0
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    for r in (r0, r1):
        assert r["value"] == {"made": True} and r["made_when_returned"] and r["torn_down"]
        assert r["agreed"] == ["last", 10]
        assert "rank 0: 0; rank 1: 1" in r["disagree"]
    assert r0["error"] == "ValueError: no scene file"
    assert r1["error"] == "RankZeroFailed: rank 0 failed to make it: ValueError: no scene file"


def _checks_worker(rank: int, world: int, port: int, out: str) -> None:
    from slq.distributed import OtherRankFailed, check_on_every_rank, distributed_from_env, release_ranks

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world))

    def only_rank1_fails():
        if rank == 1:
            time.sleep(0.5)  # the failing rank is the slow one: the other must still wait for it
            raise FileNotFoundError("backbone directory b1 not found")

    seen = {}
    try:
        with distributed_from_env():
            seen["passed"] = check_on_every_rank(lambda: rank * 10, "the checks")
            check_on_every_rank(only_rank1_fails, "the checks")
    except (FileNotFoundError, OtherRankFailed) as e:
        seen["error"] = f"{type(e).__name__}: {e}"
    seen["held_for_report"] = torch.distributed.is_initialized()  # past distributed_from_env, for the report
    release_ranks()
    seen["released"] = not torch.distributed.is_initialized()
    Path(out, f"rank{rank}.json").write_text(json.dumps(seen))


def test_ranks_agree_on_a_failed_check_before_any_stops(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_checks_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True, start_method="spawn")
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert (r0["passed"], r1["passed"]) == (0, 10)  # each rank's own result when all pass
    for r in (r0, r1):
        assert r["held_for_report"] and r["released"]
    assert r1["error"] == "FileNotFoundError: backbone directory b1 not found"  # its own error, unchanged
    assert r0["error"] == ("OtherRankFailed: stopped, because the checks failed on rank 1 "
                           "(rank 1: FileNotFoundError: backbone directory b1 not found)")


def test_single_process_helpers_make_no_group(monkeypatch):
    from slq.distributed import agree, check_on_every_rank, distributed_from_env, on_rank_zero, world_size

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with distributed_from_env():
        assert not torch.distributed.is_initialized()
        assert on_rank_zero(lambda: 5, "x") == 5 and agree(3, "y") == 3 and world_size() == 1
        with pytest.raises(ValueError, match="bad"):  # a single process: the check's own error, no group
            check_on_every_rank(lambda: (_ for _ in ()).throw(ValueError("bad")), "the checks")
        assert not torch.distributed.is_initialized()
    monkeypatch.setenv("WORLD_SIZE", "2")  # under torchrun, outside the group: a programming error, said so
    with pytest.raises(RuntimeError, match="inside distributed_from_env"):
        check_on_every_rank(lambda: None, "the checks")
