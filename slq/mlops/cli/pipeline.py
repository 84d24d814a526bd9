"""Running the pipeline: `slq run` (every stage, as `dvc repro`), `slq stage NAME` (what each
dvc.yaml stage calls), `slq readme` (the last run's methods table into the results page) and the
Prefect flow (`slq flow run`, `slq flow serve`)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer

from slq.mlops.cli.common import ParamsOpt, SetOpt, config, console, fail, one_line, rank, user_errors
from slq.mlops.cli.evaluate import show_evaluation

flow_app = typer.Typer(help="The Prefect flow: run it, or serve it on a schedule.", no_args_is_help=True)


def _rank_errors() -> tuple:
    """slq.train's errors across ranks (rank 0 failed; ranks see different files; another rank's checks
    failed), once it is loaded: evaluated when an exception is matched, so stages that never import
    torch do not pay for it."""
    dist = sys.modules.get("slq.distributed")
    return (dist.RankZeroFailed, dist.RanksDisagree, dist.OtherRankFailed) if dist is not None else ()


def _run_stages(cfg, names: list[str], method: Optional[str] = None, runner=None):
    from slq.mlops.runner import run_stage
    from slq.mlops.baselines import MethodFailed
    from slq.mlops.validation import ValidationFailed

    results = {}
    for name in names:
        if rank() == 0:
            console().rule(f"[bold]{name}")
        try:
            if runner is not None:
                results[name] = runner(name)
            else:
                results[name] = run_stage(name, cfg, method) if method else run_stage(name, cfg)
        except ValidationFailed as e:
            fail(f"validation failed; nothing downstream was run or overwritten.\n{e}")
        except (FileNotFoundError, ValueError, MethodFailed, *_rank_errors()) as e:
            fail(f"stage {name}: {e}")
    return results


@user_errors
def run(params: Path = ParamsOpt, set_: Optional[list[str]] = SetOpt,
        start: Optional[str] = typer.Option(None, "--from", help="First stage to run."),
        stop: Optional[str] = typer.Option(None, "--to", help="Last stage to run."),
        force: bool = typer.Option(False, "--force", help="Run every stage, even those DVC says are up to date.")):
    """Run the whole pipeline in this process: data -> validate -> pretrain -> train -> embed -> index ->
    evaluate -> methods -> compare -> register.

    In a DVC project it means what `dvc repro` means: a stage whose deps, params and outs match
    dvc.lock is skipped, one that ran is recorded in dvc.lock; --set is written into params.yaml
    (as `dvc exp run -S`).
    """
    from slq.mlops.config import parse_set
    from slq.mlops.runner import STAGES, prepare, run_or_skip

    config(params, set_)  # a missing params file or a bad --set fails here, before anything is written
    names = list(STAGES)
    for s in (start, stop):
        if s is not None and s not in names:
            fail(f"unknown stage {s!r}; stages: {', '.join(names)}")
    names = names[names.index(start) if start else 0: names.index(stop) + 1 if stop else len(names)]
    cfg, dvc = prepare(params, parse_set(set_), log=lambda m: console(stderr=True).print(m))
    results = _run_stages(cfg, names, runner=lambda name: run_or_skip(
        name, cfg, dvc and not force, log=lambda m: console(stderr=True).print(m)))
    if "evaluate" in results:
        show_evaluation(results["evaluate"], cfg.evaluate.metrics, cfg.evaluate.split)
    if "register" in results:
        r = results["register"]
        console().print(f"registered {r['model_name']} v{r['version']}: "
                        f"{'promoted to @' + r['alias'] if r['promoted'] else 'not promoted'} ({r['reason']})")


@user_errors
def stage(name: str = typer.Argument(..., help="validate | pretrain | train | embed | index | evaluate | methods | "
                                                  "compare | register"),
          method: Optional[str] = typer.Option(None, help="methods stage: run this one method (zero_shot, lora, "
                                                          "full) instead of every one in methods.compare"),
          params: Path = ParamsOpt, set_: Optional[list[str]] = SetOpt):
    """Run one stage (what each dvc.yaml stage calls)."""
    from slq.mlops.runner import STAGES

    if name not in STAGES:
        fail(f"unknown stage {name!r}; stages: {', '.join(STAGES)}")
    if method is not None and name != "methods":
        fail("--method applies to the methods stage only")
    cfg = config(params, set_)
    res = _run_stages(cfg, [name], method)[name]
    if rank() == 0:  # under torchrun every rank returns rank 0's result: print it once
        console().print_json(json.dumps(res, default=str))


@user_errors
def readme(params: Path = ParamsOpt, set_: Optional[list[str]] = SetOpt,
           path: Path = typer.Option(Path("docs/results.md"),
                                     help="The file whose slq:methods markers get the table.")):
    """Copy the last run's methods table (reports/methods.md) into docs/results.md, stamped with the
    commit and machine it came from. The pipeline itself never rewrites a tracked file."""
    from slq.mlops.comparison import readme_table, update_readme

    cfg = config(params, set_)
    target = path if path.is_absolute() else Path.cwd() / path
    if not update_readme(target, readme_table(cfg)):
        fail(f"{path}: no slq:methods markers (or no such file); add the two marker comments where the table goes")
    console().print(f"{path}: methods table updated from {cfg.methods.report}")


@flow_app.command("run")
@user_errors
def flow_run(params: Path = ParamsOpt, set_: Optional[list[str]] = SetOpt):
    """Run the pipeline as a Prefect flow (tasks with retries, a metrics artifact)."""
    from slq.mlops.baselines import MethodFailed
    from slq.mlops.validation import ValidationFailed

    config(params, set_)  # a missing params file or a bad --set fails here, before any flow run
    from flows.pipeline import slq_pipeline

    # key -> the value as typed: the flow parses it as YAML, as the CLI does (and as a UI run would)
    overrides = {key.strip(): raw for key, _, raw in (s.partition("=") for s in set_ or [])}
    try:
        slq_pipeline(params=str(params), overrides=overrides)
    except ValidationFailed as e:
        fail(f"validation failed; nothing downstream was run or overwritten.\n{e}")
    except (FileNotFoundError, ValueError, MethodFailed) as e:
        fail(f"the flow failed: {one_line(e)}")


@flow_app.command("serve")
@user_errors
def flow_serve(cron: str = typer.Option("0 3 * * *", help="Cron schedule."),
               name: str = typer.Option("slq-nightly", help="Deployment name."),
               params: Path = ParamsOpt):
    """Create the scheduled deployment and serve it (shows in the Prefect UI; Ctrl-C stops)."""
    config(params)  # the params file must exist now: each scheduled run reads it
    from flows.pipeline import serve_deployment

    serve_deployment(name=name, cron=cron, params=str(params))
