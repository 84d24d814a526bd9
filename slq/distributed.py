"""Several processes, one training run: joining torchrun's process group, rank 0's work done once
with every rank told the outcome, and checks every rank agrees on before any waits.

`fit` (slq.train) and the pipeline's runner use these; in a single process each is a no-op or
runs its function directly. Negatives across ranks are gathered by `slq.loss.gather_features`.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable

import torch

from slq.loss import is_distributed


def init_distributed_from_env() -> bool:
    """Join the process group torchrun set up (WORLD_SIZE > 1); no-op in a single process."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or is_distributed():
        return is_distributed()
    if torch.cuda.is_available():  # before the process group, so NCCL binds this rank's GPU
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return True


RANK0_WAIT_HOURS = 6  # how long the other ranks wait for rank 0's share (e.g. pretraining a backbone)


class RankZeroFailed(RuntimeError):
    """Raised on ranks 1..N-1 when what rank 0 did for every rank (`on_rank_zero`) failed there."""


class RanksDisagree(RuntimeError):
    """The ranks see different things where they must see the same (`agree`), e.g. a folder not shared."""


def current_rank() -> int:
    """This process's rank: the group's when one is up, else torchrun's RANK (0 in a single process)."""
    if is_distributed():
        return torch.distributed.get_rank()
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    """The number of ranks: the group's when one is up, else torchrun's WORLD_SIZE (1 in a single process)."""
    if is_distributed():
        return torch.distributed.get_world_size()
    return max(1, int(os.environ.get("WORLD_SIZE", "1")))


def is_main_process() -> bool:
    """Rank 0 (or a single process): the one that writes outputs and prints."""
    return current_rank() == 0


@contextlib.contextmanager
def distributed_from_env():
    """Join torchrun's process group for the block (`init_distributed_from_env`) and tear it down after
    it, also when the block raises. A group the caller set up beforehand is left alone."""
    created = not is_distributed() and init_distributed_from_env()
    try:
        yield
    finally:
        if created and is_distributed() and not _held_for_report:  # else release_ranks() tears it down
            torch.distributed.destroy_process_group()


def on_rank_zero(fn: Callable[[], object], what: str):
    """Rank 0 runs fn() while the other ranks wait; every rank returns rank 0's result (picklable).

    When fn raises on rank 0 the others raise `RankZeroFailed` with its message instead of waiting
    forever. The wait goes through a gloo group of its own with a `RANK0_WAIT_HOURS` timeout, so a
    long share (pretraining a backbone) does not trip the NCCL group's watchdog.
    """
    if not is_distributed():
        return fn()
    import datetime

    dist = torch.distributed
    group = dist.new_group(backend="gloo", timeout=datetime.timedelta(hours=RANK0_WAIT_HOURS))
    try:
        box: list = [None]
        error = None
        if dist.get_rank() == 0:
            try:
                box[0] = ("ok", fn())
            except BaseException as e:  # tell the others before raising here
                error = e
                box[0] = ("error", f"{type(e).__name__}: {e}")
        dist.broadcast_object_list(box, src=0, group=group)
        if error is not None:
            raise error
        status, value = box[0]
        if status != "ok":
            raise RankZeroFailed(f"rank 0 failed to {what}: {value}")
        return value
    finally:
        dist.destroy_process_group(group)


class OtherRankFailed(RuntimeError):
    """Raised on a rank whose own checks passed when another rank's failed (`check_on_every_rank`)."""


_held_for_report = False  # a group `check_on_every_rank` left up so every rank prints before any exits


def check_on_every_rank(check: Callable[[], object], what: str):
    """Run `check` (a stage's fast checks of settings and inputs) on every rank; the ranks agree on the
    outcome before any of them goes on or stops. Returns check()'s result on this rank.

    Under torchrun a rank that fails and exits makes torchrun stop the others at once (SIGTERM), often
    before they can print why, and a rank whose checks passed would go on and wait for the failed one.
    So the ranks exchange their outcomes first (one all_gather in the process group: call it inside
    `distributed_from_env`). When any rank failed, every rank raises: a failed rank its own error,
    the others `OtherRankFailed` naming the failed ranks and their errors. The group is then kept up
    (also past `distributed_from_env`) until the caller has reported the error and called
    `release_ranks()`, a barrier: no rank exits before every rank has said why (the CLI does this).
    In a single process (WORLD_SIZE unset or 1) it is a plain call.
    """
    global _held_for_report
    if not is_distributed():
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise RuntimeError("check_on_every_rank under torchrun needs the process group: call it inside "
                               "distributed_from_env()")
        return check()
    dist = torch.distributed
    error, result = None, None
    try:
        result = check()
    except Exception as e:  # noqa: BLE001 - told to the other ranks, then raised here
        error = e
    seen: list = [None] * dist.get_world_size()
    dist.all_gather_object(seen, None if error is None else f"{type(error).__name__}: {error}")
    failed = {r: msg for r, msg in enumerate(seen) if msg is not None}
    if not failed:
        return result
    _held_for_report = True  # distributed_from_env leaves the group up for release_ranks()
    if error is not None:
        raise error
    listing = "; ".join(f"rank {r}: {msg}" for r, msg in failed.items())
    raise OtherRankFailed(f"stopped, because {what} failed on {'rank' if len(failed) == 1 else 'ranks'} "
                          f"{', '.join(map(str, failed))} ({listing})")


def release_ranks() -> None:
    """After a `check_on_every_rank` failure has been reported: wait until every rank has reported
    its own (a barrier), then tear the group down. A no-op when no group is held for that."""
    global _held_for_report
    if not _held_for_report:
        return
    _held_for_report = False
    try:
        if is_distributed():
            torch.distributed.barrier()
    except Exception:  # noqa: BLE001 - a rank already gone (it crashed): nothing left to wait for
        pass
    finally:
        if is_distributed():
            torch.distributed.destroy_process_group()


def agree(value, what: str):
    """Check that every rank computed the same (picklable) `value`; raise `RanksDisagree` on every rank
    otherwise, listing each rank's. Returns `value`. Also a barrier: no rank passes it before all reach it."""
    if not is_distributed():
        return value
    dist = torch.distributed
    seen: list = [None] * dist.get_world_size()
    dist.all_gather_object(seen, value)
    if any(v != seen[0] for v in seen):
        listing = "; ".join(f"rank {r}: {v!r}" for r, v in enumerate(seen))
        raise RanksDisagree(f"the ranks disagree on {what} ({listing})")
    return value
