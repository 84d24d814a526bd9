"""Evaluation benchmarks, registered by name; params.yaml (`evaluate.benchmarks`) picks which run.

Adding one is one module with a `Benchmark` subclass decorated `@register_benchmark("name")`:
in this package, or in any installed package that names the module under the `slq.benchmarks`
entry-point group (the built-in world's benchmarks come that way, from `slq.miniature`).
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


ENTRY_POINTS = "slq.benchmarks"  # the entry-point group of benchmark plug-ins


def load_all() -> dict:
    """Import every benchmark module (registration happens on import): this package's, then the
    plug-ins installed under the `slq.benchmarks` entry-point group."""
    import importlib
    import pkgutil
    from importlib.metadata import entry_points

    import slq.benchmarks as pkg

    for mod in pkgutil.iter_modules(pkg.__path__):
        if mod.name not in ("base", "cache"):
            importlib.import_module(f"slq.benchmarks.{mod.name}")
    for ep in entry_points(group=ENTRY_POINTS):
        ep.load()
    return BENCHMARKS
