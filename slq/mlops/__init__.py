"""The MLOps layer: the pipeline's stages and their runner, DVC lineage, MLflow tracking and the
registry, the LanceDB index and search, the service, the corpus engine, reports and the CLI.

It is glue and tools around the library (`slq`); nothing in the library imports it.
"""
