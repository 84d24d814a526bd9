"""Symmetric InfoNCE with a learnable temperature and negatives gathered across ranks."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def is_distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def gather_features(x: torch.Tensor) -> torch.Tensor:
    """All ranks' rows, with the gradient kept for this rank's own shard.  (B, D) -> (W*B, D)

    Single process: returns `x` unchanged.
    """
    if not is_distributed():
        return x
    dist = torch.distributed
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.detach().contiguous())
    parts[dist.get_rank()] = x
    return torch.cat(parts, 0)


class ContrastiveLoss(nn.Module):
    """Image<->text cross-entropy over in-batch negatives, averaged both ways.

    The temperature is stored as log(t) and clamped to [min_temp, max_temp] at use (a raw
    divisor, as in the reference code, can reach zero or go negative).
    """

    def __init__(self, temperature: float = 0.07, min_temp: float = 0.01, max_temp: float = 1.0):
        super().__init__()
        self.log_temp = nn.Parameter(torch.tensor(math.log(temperature), dtype=torch.float32))
        self.min_log, self.max_log = math.log(min_temp), math.log(max_temp)

    @property
    def temperature(self) -> torch.Tensor:
        return self.log_temp.clamp(self.min_log, self.max_log).exp()

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """a, b: L2-normalised (B, D) pairs (row i of a matches row i of b)."""
        a_all, b_all = gather_features(a.float()), gather_features(b.float())  # (N, D)
        logits = a_all @ b_all.T / self.temperature  # (N, N)
        target = torch.arange(logits.shape[0], device=logits.device)
        return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))


def sync_gradients(params, log_temp: torch.Tensor) -> None:
    """Make each rank's gradients the exact gradient of the global loss.

    Every rank computes the full gathered loss but back-propagates only through its own
    shard of features, so the gradient of what trains (`params`: the queries, or a tensor list
    with LoRA/LLM weights) is the sum over ranks; the temperature is a direct input on every
    rank, so its gradient is already whole and is averaged.
    """
    if not is_distributed():
        return
    dist = torch.distributed
    for p in [params] if torch.is_tensor(params) else params:
        if p.grad is not None:
            dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
    if log_temp.grad is not None:
        dist.all_reduce(log_temp.grad, op=dist.ReduceOp.SUM)
        log_temp.grad /= dist.get_world_size()
