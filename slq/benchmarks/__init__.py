"""Evaluation benchmarks, registered by name; params.yaml (`evaluate.benchmarks`) picks which run.

Adding one is one module with a `Benchmark` subclass decorated `@register_benchmark("name")`.
"""

from slq.benchmarks.base import (
    BENCHMARKS,
    Benchmark,
    Corpus,
    DataError,
    MissingData,
    Result,
    get_benchmark,
    register_benchmark,
)

__all__ = ["BENCHMARKS", "Benchmark", "Corpus", "DataError", "MissingData", "Result", "get_benchmark",
           "register_benchmark", "load_all"]


def load_all() -> dict:
    """Import every benchmark module (registration happens on import)."""
    import importlib
    import pkgutil

    import slq.benchmarks as pkg

    for mod in pkgutil.iter_modules(pkg.__path__):
        if mod.name not in ("base", "cache", "report"):
            importlib.import_module(f"slq.benchmarks.{mod.name}")
    return BENCHMARKS
