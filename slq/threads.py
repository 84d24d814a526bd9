"""CPU threads that share a machine: how many torch uses, and how its idle ones wait (torch-free).

torch's CPU kernels run on an OpenMP thread pool (GNU libgomp in the Linux wheels). By default an
idle pool thread keeps spinning on its core for a while before it sleeps, waiting for the next
parallel region. Alone on the machine that costs nothing; beside another job it is ruinous: each
process's spinning threads take the cores the other's threads need to finish their share, so every
barrier waits a scheduler time slice. Two training processes of the built-in pipeline on 2 cores
ran each about 30x slower than alone (`bench/bench_two_jobs.py`, docs/benchmarks.md).

`apply_thread_defaults()`, called by the project's entry points (the `slq` CLI and `python cli.py`,
so every `dvc repro` stage, and `slq.mlops.runner`, so the Prefect flow) before torch is imported:

- `GOMP_SPINCOUNT=500`: an idle pool thread spins 500 rounds, not libgomp's 300,000, before it sleeps, and leaves its core to whoever needs it. Measured with two training
  jobs side by side on 2 cores (`bench/bench_two_jobs.py`, docs/benchmarks.md): libgomp's default
  keeps each at 3-26% of its speed alone, 500 at 56-70%, a passive wait (`OMP_WAIT_POLICY=PASSIVE`,
  no spin) at 85-95%; but a job alone is slowed by about 25% with 500 (0.127 -> 0.161 s a step) and
  60% with the passive wait (0.207 s: a woken thread is late to each small parallel region), so 500
  is the default: a job alone keeps most of its speed, and two never thrash. It changes no result (the same threads split the same
  work the same way). `SLQ_THREADS_WAIT=passive` picks the passive wait for a machine that is
  always shared.
- the thread count: the cores this process may use, i.e. its CPU affinity (`taskset`, a container's
  cpuset) capped by a cgroup CPU quota (`docker --cpus`). OpenMP already follows the affinity, so
  only a quota lowers it (then `OMP_NUM_THREADS` is set). The count decides a CPU result's bits
  (docs/benchmarks.md), so it does not follow the machine's load: a run gives the same numbers
  whatever else is running.

Whatever is set already wins: `OMP_WAIT_POLICY`, `GOMP_SPINCOUNT` or `OMP_NUM_THREADS` in the
environment are kept (a wait policy set by hand also keeps the spin count unset: libgomp derives it).
`SLQ_THREADS` overrides: `auto` (the default, as above), a whole number (that many threads,
`OMP_NUM_THREADS`, with the short spin), or `off` (set nothing: torch's and OpenMP's own
defaults, the behaviour before this module).
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import MutableMapping
from pathlib import Path

ENV = "SLQ_THREADS"
WAIT_ENV = "SLQ_THREADS_WAIT"  # spin (default: a short spin, SPIN_COUNT) or passive
SPIN_COUNT = "500"


def cpu_budget(cgroup_root: str | Path = "/sys/fs/cgroup") -> int:
    """The cores this process may use: its CPU affinity, capped by its cgroup's CPU quota (rounded up)."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        n = os.cpu_count() or 1
    quota = cgroup_cpu_quota(cgroup_root)
    if quota is not None:
        n = min(n, max(1, math.ceil(quota)))
    return max(1, n)


def cgroup_cpu_quota(root: str | Path = "/sys/fs/cgroup") -> float | None:
    """CPUs' worth of time the cgroup allows (cgroup v2 `cpu.max`, v1 `cpu.cfs_quota_us`); None: no limit."""
    root = Path(root)
    try:
        v2 = root / "cpu.max"
        if v2.is_file():
            quota, period = v2.read_text().split()[:2]
            return None if quota == "max" else int(quota) / int(period)
        v1 = root / "cpu" / "cpu.cfs_quota_us"
        if v1.is_file():
            quota = int(v1.read_text())
            period = int((root / "cpu" / "cpu.cfs_period_us").read_text())
            return None if quota <= 0 else quota / period
    except (OSError, ValueError):
        return None
    return None


def thread_settings(environ: MutableMapping[str, str] | None = None, budget: int | None = None) -> dict[str, str]:
    """The environment variables `apply_thread_defaults` sets (those not set already); {} for `off`.
    A bad `SLQ_THREADS` is a ValueError of one line."""
    environ = os.environ if environ is None else environ
    choice = environ.get(ENV, "auto").strip().lower() or "auto"
    if choice == "off":
        return {}
    wait = environ.get(WAIT_ENV, "spin").strip().lower() or "spin"
    if wait not in ("spin", "passive"):
        raise ValueError(f"{WAIT_ENV}={environ[WAIT_ENV]!r}: expected spin (a short spin, the default) or passive")
    if "OMP_WAIT_POLICY" in environ or "GOMP_SPINCOUNT" in environ:
        want: dict[str, str] = {}  # the wait was set by hand
    elif wait == "passive":
        want = {"OMP_WAIT_POLICY": "PASSIVE"}
    else:
        want = {"GOMP_SPINCOUNT": SPIN_COUNT}
    if choice == "auto":
        budget = cpu_budget() if budget is None else budget
        try:
            affinity = len(os.sched_getaffinity(0))
        except AttributeError:
            affinity = os.cpu_count() or 1
        if budget < affinity:  # a CPU quota: OpenMP would count the affinity's cores
            want["OMP_NUM_THREADS"] = str(budget)
    elif choice.isdigit() and int(choice) >= 1:
        want["OMP_NUM_THREADS"] = str(int(choice))
    else:
        raise ValueError(f"{ENV}={environ[ENV]!r}: expected auto, off or a whole number of threads >= 1 "
                         f"(unset it for the default, auto)")
    return {k: v for k, v in want.items() if k not in environ or (k == "OMP_NUM_THREADS" and choice != "auto")}


def apply_thread_defaults(environ: MutableMapping[str, str] | None = None) -> dict[str, str]:
    """Set the thread defaults (module docstring) in the environment; returns what it set. Call it before
    torch is imported: OpenMP reads its wait settings once, when torch loads it. If torch is loaded
    already, only the thread count still takes effect (torch.set_num_threads)."""
    environ = os.environ if environ is None else environ
    settings = thread_settings(environ)
    environ.update(settings)
    if "OMP_NUM_THREADS" in settings and "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(int(settings["OMP_NUM_THREADS"]))
    return settings
