"""Pretrain stage: the built-in backbone, a tiny MLLM pretrained generatively on the world.

With your own backbone (backbone.path elsewhere, or backbone.builtin: false) nothing is trained:
the folder gets a note saying so, so `dvc repro` still has its output.
"""

from __future__ import annotations

from slq.mlops import builtin
from slq.mlops.config import Config


def run(cfg: Config) -> dict:
    return builtin.build_backbone(cfg)
