"""The MLflow side: `slq promote` (the gated champion alias) and `slq runs list|show|compare`.

Every look-up goes through slq.mlops.tracking, which never creates a tracking store: a missing
store, model, version or run is one `error: ...` line (its TrackingError)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from slq.mlops.cli.common import JsonOpt, ParamsOpt, SetOpt, config, console, fail, print_json, print_table, \
    user_errors

runs_app = typer.Typer(help="Pipeline runs recorded in MLflow.", no_args_is_help=True)


@user_errors
def promote(version: int = typer.Argument(..., help="Model version to promote."),
            force: bool = typer.Option(False, help="Skip the metric gate."),
            params: Path = ParamsOpt, set_: Optional[list[str]] = SetOpt):
    """Give a registered version the champion alias (only if it beats the champion, unless --force).

    Exit code 2 when the gate refuses it."""
    from slq.mlops.tracking import model_version, promote as do_promote

    cfg = config(params, set_)
    model_version(cfg, version)
    d = do_promote(cfg, version, force=force)
    console().print(f"{'promoted' if d['promoted'] else 'refused'}: {d['reason']}")
    if not d["promoted"]:
        raise typer.Exit(2)


@runs_app.command("list")
@user_errors
def runs_list(n: int = typer.Option(10, help="How many runs."), params: Path = ParamsOpt,
              set_: Optional[list[str]] = SetOpt, as_json: bool = JsonOpt):
    """The newest pipeline runs (full run ids and names)."""
    from slq.mlops.tracking import existing_store, list_runs, metric_key

    if n < 1:
        fail(f"--n must be at least 1, got {n}")
    cfg = config(params, set_)
    existing_store(cfg)
    rows = list_runs(cfg, n)
    if as_json:
        print_json(rows)
        return
    if not rows:
        console().print(f"no runs yet in experiment {cfg.register.experiment!r}")
        return
    gm = metric_key(cfg.register.gate_metric)
    for r in rows:
        r["start_time"] = str(r["start_time"])[:19].replace("T", " ")  # UTC, to the second
    cols = ["run_id", "run_name", "stage", "start_time", "status", gm, "version", "promoted"]
    print_table(f"runs of {cfg.register.experiment} (UTC)", rows, cols, keep=("run_id", "run_name", "start_time"))


@runs_app.command("show")
@user_errors
def runs_show(run_id: str = typer.Argument(..., help="A run id (`slq runs list`)."),
              params: Path = ParamsOpt, set_: Optional[list[str]] = SetOpt, as_json: bool = JsonOpt):
    """Params, metrics, tags, artifacts and model versions of one run."""
    from slq.mlops.tracking import run_info

    cfg = config(params, set_)
    info = run_info(cfg, run_id)
    if as_json:
        print_json(info)
        return
    con = console()
    for k in ("run_id", "run_name", "status", "experiment_id", "artifact_uri"):
        con.print(f"{k}: {info[k]}", soft_wrap=True, markup=False, highlight=False)
    versions = ", ".join(f"{v['name']} v{v['version']}" + "".join(f" @{a}" for a in v["aliases"])
                         for v in info["model_versions"]) or "none"
    con.print(f"model versions: {versions}", soft_wrap=True, markup=False, highlight=False)
    print_table("params", [{"param": k, "value": v} for k, v in sorted(info["params"].items())],
                ["param", "value"], keep=("param",))
    print_table("metrics", [{"metric": k, "value": v} for k, v in sorted(info["metrics"].items())],
                ["metric", "value"], keep=("metric",))
    print_table("tags", [{"tag": k, "value": v} for k, v in sorted(info["tags"].items())], ["tag", "value"],
                keep=("tag",))
    con.print(f"artifacts: {', '.join(info['artifacts']) or 'none'}", soft_wrap=True, markup=False, highlight=False)


@runs_app.command("compare")
@user_errors
def runs_compare(run_ids: list[str] = typer.Argument(..., help="Two or more run ids (`slq runs list`)."),
                 all_: bool = typer.Option(False, "--all", help="Every param, not only those that differ."),
                 params: Path = ParamsOpt, set_: Optional[list[str]] = SetOpt, as_json: bool = JsonOpt):
    """Params and metrics of two or more runs side by side, differing rows marked *.

    Params: only those that differ, unless --all; metrics: all of them."""
    from slq.mlops.tracking import compare_runs

    if len(run_ids) < 2:
        fail("give two or more run ids to compare (`slq runs list` shows them)")
    cfg = config(params, set_)
    cmp = compare_runs(cfg, run_ids)
    if as_json:
        print_json(cmp)
        return
    labels = [chr(ord("A") + i) if i < 26 else f"R{i}" for i in range(len(cmp["runs"]))]
    con = console()
    for label, r in zip(labels, cmp["runs"]):
        con.print(f"{label} = {r['run_id']} ({r['run_name']}, {r['status']})", soft_wrap=True, markup=False,
                  highlight=False)
    for section, what in (("params", "param"), ("metrics", "metric")):
        differ = cmp["differ"][section]
        keys = [k for k in cmp[section] if all_ or section == "metrics" or k in differ]
        rows = [{what: k, "": "*" if k in differ else "", **dict(zip(labels, cmp[section][k]))} for k in keys]
        title = f"{section}: {len(differ)} of {len(cmp[section])} differ" + (
            "" if all_ or section == "metrics" else " (--all: every one)")
        print_table(title, rows, [what, "", *labels], keep=(what,))
