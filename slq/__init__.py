"""slq: Shared Latent Queries turn a frozen multimodal LLM into a retriever.

    from slq import SLQEncoder, fit, FitConfig

Names are resolved lazily so that `import slq.mlops.config` (the CLI) does not import torch.
This package is the library; `slq.mlops` (the pipeline, tracking, serving) and `slq.miniature`
(the built-in offline default) are built on it and are not part of this API.
"""

__version__ = "0.1.0"

_LAZY = {
    "SLQEncoder": "slq.encoder",
    "fit": "slq.train",
    "FitConfig": "slq.recipe",
    "Prompts": "slq.prompts",
    "TrainingDiverged": "slq.train",
    "ContrastiveLoss": "slq.loss",
    "LatentQueries": "slq.queries",
    "load_backbone": "slq.backbones",
    "from_pretrained": "slq.methods",  # any registered method, picked by the checkpoint's `method`
    "get_method": "slq.methods",
    "load_manifest": "slq.data",
}
__all__ = sorted(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'slq' has no attribute {name!r}")
