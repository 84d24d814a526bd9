"""`slq`: run and inspect the pipeline, search the index, promote and serve the model.

Thin Typer sub-apps that parse arguments, call slq.mlops (or the library) and print: pipeline
(run, stage, readme, flow), data, evaluate (evaluate, metrics), search (search, serve), registry
(promote, runs), export (a portable model folder), corpus; plug-ins add sub-apps under the
`slq.cli` entry-point group (the miniature's backbone and study come that way). Heavy
libraries (torch, mlflow, prefect, lancedb, GX) are imported inside the commands, so `slq --help`
answers at once.
"""

from __future__ import annotations

import os

for _k, _v in {"DO_NOT_TRACK": "1", "DVC_NO_ANALYTICS": "1", "GX_ANALYTICS_ENABLED": "false",
               "MLFLOW_DISABLE_TELEMETRY": "true", "MLFLOW_SKIP_PIP_REQUIREMENTS_CHECK": "true",
               "TOKENIZERS_PARALLELISM": "false"}.items():
    os.environ.setdefault(_k, _v)

from slq.threads import apply_thread_defaults  # noqa: E402  (torch's CPU threads: before torch loads)

try:
    apply_thread_defaults()
except ValueError as _e:
    raise SystemExit(f"error: {_e}") from None

from importlib.metadata import entry_points  # noqa: E402

import typer  # noqa: E402

from slq.mlops.cli import corpus, data, evaluate, export, pipeline, registry, search  # noqa: E402
from slq.mlops.cli.common import OneLineUsage  # noqa: E402

app = typer.Typer(help="SLQ: turn a frozen multimodal LLM into a retriever with shared latent queries.",
                  no_args_is_help=True, add_completion=False, cls=OneLineUsage)

# the top-level commands, in `slq --help` order
for _command in (pipeline.run, pipeline.stage, pipeline.readme, evaluate.evaluate, evaluate.metrics,
                 search.search, registry.promote, search.serve, export.export):
    app.command()(_command)

for _name, _sub in (("runs", registry.runs_app), ("data", data.app), ("flow", pipeline.flow_app),
                    ("corpus", corpus.app)):
    app.add_typer(_sub, name=_name)
for _ep in sorted(entry_points(group="slq.cli"), key=lambda ep: ep.name):  # plug-in sub-apps
    app.add_typer(_ep.load(), name=_ep.name)


def main():
    app()
