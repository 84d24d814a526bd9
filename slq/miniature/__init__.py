"""The built-in miniature: the synthetic world, the tiny and SmolLM2 backbone builders, generative
pretraining, the knowledge probe and the seed study.

It makes the whole pipeline run offline on a CPU. The library and the MLOps layer never import it,
except through `slq.mlops.builtin`, the one gateway used when the built-in default is configured.
"""
