"""What every command shares: the --params/--set/--json options, the config they load, printing
(console, JSON, tables) and the one-line user errors.

Light to import (typer and the standard library): `slq --help` must not load torch, MLflow or
LanceDB; every command imports what it needs inside.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import sys
from pathlib import Path
from typing import Optional

import typer
from typer.core import TyperGroup

ParamsOpt = typer.Option("params.yaml", "--params", "-p", help="The params file (all paths and settings).")
SetOpt = typer.Option(None, "--set", "-s", help="Override a param: section.key=value (YAML value). Repeatable.")
JsonOpt = typer.Option(False, "--json", help="Machine-readable JSON on stdout (nothing else there).")


def config(params: Path, overrides: Optional[list[str]] = None):
    """The config: `params` (which must exist) with `--set` overrides, each value parsed as YAML
    (the same rule in every command and in the Prefect flow)."""
    from slq.mlops.config import ConfigError, load_config

    try:
        return load_config(params, list(overrides or []))
    except ConfigError as e:
        fail(str(e))


def console(stderr: bool = False):
    from rich.console import Console

    return Console(stderr=stderr)


def print_json(obj) -> None:
    """`obj` as JSON on stdout, and nothing else."""
    sys.stdout.write(json.dumps(obj, default=str, indent=2) + "\n")
    sys.stdout.flush()


def rank() -> int:
    """This process's rank under torchrun (RANK), 0 in a single process: only rank 0 prints results."""
    return int(os.environ.get("RANK", "0"))


def fail(msg: str, code: int = 1):
    from rich.markup import escape

    # every rank reports its own error (under torchrun, named by rank)
    where = f"rank {rank()}: " if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""
    # on stderr (stdout stays clean for --json); soft_wrap: no line breaks inside paths;
    # escape: brackets in the message are text, not markup
    console(stderr=True).print(f"[bold red]error:[/] {where}{escape(msg)}", soft_wrap=True)
    sys.stderr.flush()
    distributed = sys.modules.get("slq.distributed")
    if distributed is not None:  # the ranks agreed on a failed check: wait until each has printed its own
        distributed.release_ranks()
    raise typer.Exit(code)


# module -> its exception type that is the user's to fix
USER_ERRORS = {"slq.mlops.config": "ConfigError", "slq.backbones.base": "BackboneError",
               "slq.checkpoint": "CheckpointError", "slq.inputs": "InputError", "slq.data.coco": "CocoError", "slq.data.importers": "DataImportError",
               "slq.benchmarks.base": "DataError", "slq.mlops.tracking": "TrackingError", "slq.mlops.corpus.errors": "CorpusError", "slq.export": "ExportError",
               "slq.mlops.records": "StaleRecordError", "slq.data.manifest": "ManifestError",
               "mlflow.exceptions": "MlflowException"}


def user_error_types() -> tuple:
    """The exception types that are the user's to fix (bad config, input, checkpoint, backbone, a
    missing file, no MLflow store, an unknown MLflow run or version), among the modules loaded so
    far: a module that was never imported cannot have raised its error, and `slq --help` stays fast."""
    types = [getattr(sys.modules[m], n) for m, n in USER_ERRORS.items() if m in sys.modules]
    return (FileNotFoundError, NotADirectoryError, IsADirectoryError, *types)


def one_line(e: BaseException) -> str:
    """The error's message: an OS error as "what: path", MLflow's as its message."""
    if isinstance(e, OSError) and e.filename is not None:
        return f"{e.strerror or type(e).__name__}: {e.filename}"
    return str(getattr(e, "message", None) or e).strip() or type(e).__name__


def user_errors(fn):
    """Every command: a user error is one `error: ...` line and exit code 1, never a traceback
    (SLQ_DEBUG=1 re-raises it, traceback and all)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (typer.Exit, typer.Abort, KeyboardInterrupt):
            raise
        except Exception as e:
            if os.environ.get("SLQ_DEBUG") or not isinstance(e, user_error_types()):
                raise
            fail(one_line(e))

    return wrapper


class OneLineUsage(TyperGroup):
    """The root command group: an option or argument the command line gets wrong (a value of the
    wrong type, an unknown option) is one `error:` line too, naming it and pointing at --help, with
    click's usage exit code, 2; `slq` alone still shows the help."""

    def make_context(self, *args, **kwargs):
        with _usage_in_one_line():
            return super().make_context(*args, **kwargs)

    def invoke(self, ctx):
        with _usage_in_one_line():
            return super().invoke(ctx)


# click's (typer >= 0.26 carries its own copy of click: found through the public BadParameter)
_UsageError = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "UsageError")


@contextlib.contextmanager
def _usage_in_one_line():
    try:
        yield
    except _UsageError as e:
        if type(e).__name__ == "NoArgsIsHelpError":  # `slq`, `slq runs`: the help, as before
            raise
        ctx = getattr(e, "ctx", None)
        see = f" (see `{ctx.command_path} --help`)" if ctx is not None else ""
        from rich.markup import escape

        message = " ".join(e.format_message().split())
        console(stderr=True).print(f"[bold red]error:[/] {escape(message)}{escape(see)}", soft_wrap=True)
        raise typer.Exit(e.exit_code) from None


def print_table(title: str, rows: list[dict], columns: list[str] | None = None, keep: tuple = ()):
    """A rich table; the columns in `keep` are never wrapped or cut (ids to copy): the console
    widens to fit them rather than fold them."""
    from rich.console import Console
    from rich.measure import Measurement
    from rich.table import Table

    columns = columns or (list(rows[0]) if rows else [])
    t = Table(title=title)
    for c in columns:
        t.add_column(c, no_wrap=c in keep, overflow="ignore" if c in keep else "fold")
    for r in rows:
        t.add_row(*["" if r.get(c) is None else (f"{r[c]:.4f}" if isinstance(r.get(c), float) else str(r[c]))
                    for c in columns])
    con = console()
    if keep:
        m = Measurement.get(con, con.options.update_width(100_000), t)
        need = min(m.maximum, m.minimum + 40)  # the kept columns whole, the others some room
        if m.minimum > con.width:
            con = Console(width=need)
    con.print(t)
