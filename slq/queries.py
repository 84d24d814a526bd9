"""The shared latent queries: one bank of N_q learnable vectors for every modality.

Kept as an fp32 master copy and cast to the backbone's dtype at use, so bf16 rounding never
accumulates into the parameters.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class LatentQueries(nn.Module):
    def __init__(self, num_queries: int, hidden_size: int):
        super().__init__()
        if num_queries < 1:
            raise ValueError(f"num_queries must be >= 1, got {num_queries}")
        self.weight = nn.Parameter(torch.empty(num_queries, hidden_size, dtype=torch.float32))  # (Nq, D)
        self.reset_random()

    @property
    def num_queries(self) -> int:
        return self.weight.shape[0]

    @property
    def hidden_size(self) -> int:
        return self.weight.shape[1]

    @torch.no_grad()
    def reset_random(self, generator: torch.Generator | None = None) -> None:
        """Gaussian init with std 1/sqrt(d): the scale of a typical token embedding's entries."""
        std = 1.0 / math.sqrt(self.hidden_size)
        self.weight.copy_(torch.randn(self.weight.shape, generator=generator) * std)

    @torch.no_grad()
    def init_from_embeddings(self, token_embeddings: torch.Tensor) -> None:
        """Init from token embeddings of a text (cycled if shorter than N_q).  (T, D)"""
        if token_embeddings.shape[0] == 0:
            raise ValueError("cannot initialise queries from an empty text")
        idx = torch.arange(self.num_queries) % token_embeddings.shape[0]
        self.weight.copy_(token_embeddings[idx].float())

    def forward(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return self.weight if dtype is None else self.weight.to(dtype)  # (Nq, D)
