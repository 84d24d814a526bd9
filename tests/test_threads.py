"""slq.threads: the CPU thread defaults the entry points apply before torch loads (a short OpenMP
spin, or the passive wait; the thread count sized to the cores the process may use), their override, and that they change
neither a lone job's thread count nor its result. (Two jobs side by side: bench/bench_two_jobs.py.)"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from slq.threads import ENV, SPIN_COUNT, WAIT_ENV, apply_thread_defaults, cgroup_cpu_quota, cpu_budget, thread_settings

REPO = Path(__file__).resolve().parents[1]
AFFINITY = len(os.sched_getaffinity(0))
CLEAN = ("OMP_WAIT_POLICY", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "GOMP_SPINCOUNT", ENV, WAIT_ENV)
SPIN = {"GOMP_SPINCOUNT": SPIN_COUNT}


def test_auto_spins_briefly_and_keeps_the_cores_the_process_may_use():
    assert SPIN_COUNT == "500"
    assert thread_settings({}, budget=AFFINITY) == SPIN  # OpenMP's own count already
    assert thread_settings({ENV: "auto"}, budget=AFFINITY) == SPIN
    if AFFINITY > 1:  # a CPU quota below the affinity's cores lowers the count
        assert thread_settings({}, budget=AFFINITY - 1) == {**SPIN, "OMP_NUM_THREADS": str(AFFINITY - 1)}
    assert thread_settings({WAIT_ENV: "passive"}, budget=AFFINITY) == {"OMP_WAIT_POLICY": "PASSIVE"}
    assert thread_settings({WAIT_ENV: "Spin"}, budget=AFFINITY) == SPIN


def test_what_is_set_already_wins_and_the_override():
    assert thread_settings({"OMP_WAIT_POLICY": "ACTIVE"}, budget=AFFINITY) == {}
    assert thread_settings({"GOMP_SPINCOUNT": "10"}, budget=AFFINITY) == {}
    assert thread_settings({"OMP_NUM_THREADS": "1"}, budget=1) == SPIN
    assert thread_settings({ENV: "off"}) == {}  # the behaviour before: nothing set
    assert thread_settings({ENV: " OFF "}) == {}
    assert thread_settings({ENV: "3"}) == {**SPIN, "OMP_NUM_THREADS": "3"}
    assert thread_settings({ENV: "3", "OMP_NUM_THREADS": "8"})["OMP_NUM_THREADS"] == "3"  # the override wins


@pytest.mark.parametrize("bad", ["0", "-2", "two", "1.5"])
def test_a_bad_override_is_one_line(bad):
    with pytest.raises(ValueError, match=rf"^{ENV}='{bad}': expected auto, off or a whole number of threads >= 1") as e:
        thread_settings({ENV: bad})
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match=rf"^{WAIT_ENV}='{bad}': expected spin"):
        thread_settings({WAIT_ENV: bad})


def test_apply_sets_the_environment_and_reports_it():
    env = {}
    applied = apply_thread_defaults(env)
    assert applied["GOMP_SPINCOUNT"] == SPIN_COUNT and env == applied
    assert apply_thread_defaults(env) == {}  # once is enough: nothing set twice


def test_cgroup_quota_v2_and_v1(tmp_path):
    v2 = tmp_path / "v2"
    v2.mkdir()
    (v2 / "cpu.max").write_text("150000 100000\n")
    assert cgroup_cpu_quota(v2) == 1.5
    assert cpu_budget(v2) == min(AFFINITY, 2)  # 1.5 CPUs' time: 2 threads (rounded up)
    (v2 / "cpu.max").write_text("max 100000\n")
    assert cgroup_cpu_quota(v2) is None and cpu_budget(v2) == AFFINITY
    v1 = tmp_path / "v1"
    (v1 / "cpu").mkdir(parents=True)
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("50000\n")
    (v1 / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert cgroup_cpu_quota(v1) == 0.5 and cpu_budget(v1) == 1
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")
    assert cgroup_cpu_quota(v1) is None
    assert cgroup_cpu_quota(tmp_path / "none") is None


def _probe(code: str, **env) -> dict:
    """Run `code` (which prints JSON) in a fresh interpreter, the thread variables cleared, `env` added."""
    run_env = {k: v for k, v in os.environ.items() if k not in CLEAN}
    run_env.update(env, HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO))
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=run_env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


PROBE = ("import os, json, {entry}; import torch; "
         "print(json.dumps({{'wait': os.environ.get('OMP_WAIT_POLICY') or os.environ.get('GOMP_SPINCOUNT'), "
         "'threads': torch.get_num_threads()}}))")


@pytest.mark.parametrize("entry", ["cli", "slq.mlops.runner"])
def test_the_entry_points_apply_it_before_torch_loads(entry):
    """The CLI (every dvc.yaml stage is `python cli.py stage ...`) and the runner (the Prefect flow) set
    the short spin; a job alone keeps torch's own thread count (so its results keep their bits)."""
    plain = _probe("import json, torch; print(json.dumps({'threads': torch.get_num_threads()}))")
    got = _probe(PROBE.format(entry=entry))
    assert got == {"wait": SPIN_COUNT, "threads": plain["threads"]}
    assert _probe(PROBE.format(entry=entry), SLQ_THREADS="off") == {"wait": None, "threads": plain["threads"]}
    assert _probe(PROBE.format(entry=entry), SLQ_THREADS="1") == {"wait": SPIN_COUNT, "threads": 1}
    assert _probe(PROBE.format(entry=entry), SLQ_THREADS_WAIT="passive")["wait"] == "PASSIVE"
    assert _probe(PROBE.format(entry=entry), OMP_WAIT_POLICY="ACTIVE")["wait"] == "ACTIVE"


def test_a_bad_override_stops_the_cli_with_one_line():
    env = {k: v for k, v in os.environ.items() if k not in CLEAN}
    out = subprocess.run([sys.executable, "cli.py", "--help"], cwd=REPO, capture_output=True, text=True,
                         env={**env, ENV: "lots"})
    assert out.returncode == 1
    assert out.stderr.strip() == ("error: SLQ_THREADS='lots': expected auto, off or a whole number of threads >= 1 "
                                  "(unset it for the default, auto)")


TRAIN = """
import hashlib, json, sys
from slq.threads import apply_thread_defaults
apply_thread_defaults()
import torch
from slq.encoder import SLQEncoder
from slq.miniature.tiny import build_tiny_backbone
from slq.train import FitConfig, fit
from PIL import Image
bb = sys.argv[1]
enc = SLQEncoder.from_pretrained(bb, num_queries=4, seed=3)
colors = ["red", "green", "blue", "yellow", "purple", "orange", "white", "cyan"]
pairs = [(Image.new("RGB", (56, 56), c), f"a {c} square number {i}") for i in range(4) for c in colors]
res = fit(enc, pairs, FitConfig(steps=4, batch_size=16, lr=5e-2, warmup_steps=1, save_every=100), progress=False)
h = hashlib.sha256(enc.queries.weight.detach().numpy().tobytes() + res.log_temp.numpy().tobytes()).hexdigest()
print(json.dumps({"sha": h, "threads": torch.get_num_threads()}))
"""


def test_the_defaults_change_no_result(tiny_dirs):
    """The same training with the defaults and without them (`SLQ_THREADS=off`): the same bits."""
    code = TRAIN.replace("sys.argv[1]", repr(str(tiny_dirs["qwen3_vl"])))
    assert _probe(code) == _probe(code, SLQ_THREADS="off")
