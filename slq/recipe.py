"""The training recipe: one class, the paper's values by default (torch-free).

`FitConfig` is what `slq.train.fit` reads and what params.yaml's `train` section is
(slq.mlops.config), so every default is written here once. The defaults are the paper's recipe
(arXiv 2604.13710): N_q 20, batch 32 per GPU, lr 5e-4, 100 warm-up steps, one epoch of COCO
captions, texts cut at 128 tokens. The built-in miniature's own values are in params.yaml.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class FitConfig:
    # the model: how many queries and how they start
    num_queries: int = 20
    init: str = "random"  # "random" or "text:<words>" (token embeddings of a text)
    # the training loop (slq.train.fit reads these: LOOP_FIELDS)
    steps: int = 17_710  # one epoch of COCO Karpathy train + restval (566,747 captions) at 32 a step on one GPU
    batch_size: int = 32  # per rank
    lr: float = 5e-4
    weight_decay: float = 0.0
    warmup_steps: int = 100
    grad_clip: float = 1.0
    temperature: float = 0.07
    save_every: int = 500  # periodic checkpoints (resume): every this many steps, or
    save_every_minutes: float | None = 5.0  # this many minutes after the last, whichever first (None: by step only)
    seed: int = 0
    split_forward: bool = True  # prefix under no_grad into a KV cache; only the queries under autograd
    max_text_tokens: int | None = 128  # a templated caption's token budget (the reference: 128); None: no cut
    num_workers: int = 0  # DataLoader processes building batches ahead (0: in the training process)
    prefix_buckets: int = 1  # split forward: the prompt in up to this many length groups (less padding; same result)
    compile_queries: bool = False  # split forward: torch.compile the query step (CUDA graphs on GPU; same result)
    # the method (slq.methods): SLQ, or what it is compared with
    method: str = "slq"  # slq | zero_shot | lora | full
    pooling: str | None = None  # the method's default: queries for slq, last_token otherwise
    lora_r: int = 8
    lora_alpha: int = 16
    # where a pipeline run writes (params.yaml sets them; `fit` itself takes its work_dir as an argument)
    out: str = "checkpoints/slq"  # the checkpoint folder
    work_dir: str = "checkpoints/.work"  # periodic checkpoints for resume
    metrics: str = "metrics/train.json"
    history: str = "metrics/train_history.csv"

    def loop_settings(self) -> dict:
        """The training loop's share (LOOP_FIELDS): what a checkpoint's manifest records as `training`."""
        return {k: getattr(self, k) for k in LOOP_FIELDS}


# the fields `slq.train.fit` reads and a checkpoint's manifest records (`save_every_minutes`, read too, is
# left out: when a run saves changes nothing of its result, and a manifest that gained it would hash anew)
LOOP_FIELDS = ("steps", "batch_size", "lr", "weight_decay", "warmup_steps", "grad_clip", "temperature",
               "save_every", "seed", "split_forward", "max_text_tokens", "num_workers", "prefix_buckets",
               "compile_queries")
