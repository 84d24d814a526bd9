"""Validate stage: check the manifest and its images with a Great Expectations suite.

Training on broken data fails late and silently (a missing image crashes step 900, a test image
seen in training inflates recall), so this stage runs first and stops the pipeline with a message
that says what is wrong, on which rows, and what to fix.

Per-row facts GX cannot see (does the file exist, does it decode, is it shared between train and
an eval split) are computed in pandas as derived columns that hold the offending value, or null
when the row is fine; the suite then checks them alongside the plain manifest columns.

The report is written only when the data passes, so downstream stages (and DVC) never see a
report for bad data; a failing run writes `<report stem>.failed.json` next to it instead.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import TYPE_CHECKING

from slq.config import Config, ValidateConfig
from slq.data.world import load_manifest
from slq.io import write_json_atomic

if TYPE_CHECKING:  # pandas and PIL load when the stage runs, not with the CLI
    import pandas as pd

COLUMNS = ("id", "image_id", "image", "caption", "split")


class ValidationFailed(Exception):
    """The data broke at least one expectation; `report` holds the full results."""

    def __init__(self, message: str, report: dict, report_path: Path):
        super().__init__(message)
        self.report = report
        self.report_path = report_path


def run(cfg: Config) -> dict:
    """Validate the manifest at `data.root`; write the report, or raise `ValidationFailed`."""
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    v = cfg.validate
    root = cfg.path(cfg.data.root)
    df = build_frame(load_manifest(root, cfg.data.manifest), root, v)
    docs = cfg.path(v.data_docs) if v.data_docs else None
    results = _check(df, _expectations(v), docs, v.examples)
    success = all(r["success"] for r in results)
    report = {
        "success": success,
        "manifest": f"{cfg.data.root}/{cfg.data.manifest}",
        **_counts(df),
        "expectations": results,
        "data_docs": f"{v.data_docs}/index.html" if docs else None,
    }
    path = cfg.path(v.report)
    failed_path = path.with_suffix(".failed.json")
    if not success:
        write_json_atomic(failed_path, report)
        raise ValidationFailed(_failure_message(report, failed_path), report, failed_path)
    write_json_atomic(path, report)
    failed_path.unlink(missing_ok=True)  # a stale failure report would only confuse
    return {"success": True, **_counts(df), "report": str(path)}


def build_frame(rows: list[dict], root: Path, v: ValidateConfig) -> pd.DataFrame:
    """The manifest as a DataFrame plus derived columns, each the offending value or None.

    image_missing: the image path when the file does not exist; image_error: why an existing
    file does not decode; leak: which train image an eval-split row reuses.
    """
    import pandas as pd

    df = pd.DataFrame(rows)
    for c in COLUMNS:
        if c not in df:
            df[c] = None
    df = df.astype(object).where(df.notna(), None)
    ids, splits = df["image_id"].tolist(), df["split"].tolist()
    norm = [os.path.normpath(p) if isinstance(p, str) else None for p in df["image"]]
    problems = {p: _image_problem(Path(root) / p) for p in set(norm) - {None}}
    df["image_missing"] = [p if p and problems[p] == "missing" else None for p in norm]
    df["image_error"] = [problems[p] if p and problems[p] != "missing" else None for p in norm]

    train_ids = {i for i, s in zip(ids, splits) if s == "train"} - {None}
    train_paths = {p for p, s in zip(norm, splits) if s == "train"} - {None}

    def leak(image_id, path, split):
        if split not in v.eval_splits:
            return None
        shared = [f"image_id {image_id}"] if image_id in train_ids else []
        shared += [f"image {path}"] if path in train_paths else []
        return " and ".join(shared) + " also used by train" if shared else None

    df["leak"] = [leak(*row) for row in zip(ids, norm, splits)]
    return df


def _image_problem(path: Path) -> str | None:
    """'missing', an error message if the file does not decode, or None when it is a good image."""
    from PIL import Image

    if not path.is_file():
        return "missing"
    try:
        with Image.open(path) as im:
            im.verify()  # checks the structure (chunk CRCs for PNG) ...
        with Image.open(path) as im:
            im.load()  # ... and this decodes every pixel (catches truncation)
    except Exception as e:  # PIL raises many kinds: OSError, SyntaxError, ValueError, ...
        return f"{type(e).__name__}: {e}"
    return None


def _expectations(v: ValidateConfig) -> list:
    """The suite; each expectation's meta says what to fix when it fails."""
    import great_expectations.expectations as gxe

    lo, hi = v.min_caption_chars, v.max_caption_chars
    return [
        gxe.ExpectTableRowCountToBeBetween(min_value=1, meta={"fix": "the manifest is empty: regenerate the data"}),
        *[gxe.ExpectColumnValuesToNotBeNull(column=c, meta={"fix": f"fill in `{c}` on every manifest row"})
          for c in COLUMNS],
        gxe.ExpectColumnValuesToBeUnique(column="id", meta={"fix": "give every manifest row its own `id`"}),
        gxe.ExpectColumnValueLengthsToBeBetween(
            column="caption", min_value=lo, max_value=hi,
            meta={"fix": f"fix or drop captions outside {lo}..{hi} characters "
                         "(or change validate.min_caption_chars/max_caption_chars)"}),
        gxe.ExpectColumnValuesToBeInSet(
            column="split", value_set=list(v.splits),
            meta={"fix": f"use one of {list(v.splits)} as `split` (or change validate.splits)"}),
        gxe.ExpectColumnValuesToBeNull(
            column="image_missing", meta={"fix": "add the missing image files under data.root or drop their rows"}),
        gxe.ExpectColumnValuesToBeNull(
            column="image_error", meta={"fix": "replace the corrupt image files (PIL cannot decode them)"}),
        gxe.ExpectColumnValuesToBeNull(
            column="leak", meta={"fix": f"drop the rows in {list(v.eval_splits)} that reuse train images, "
                                        "or move those images out of train"}),
    ]


def _check(df: pd.DataFrame, expectations: list, docs: Path | None, examples: int) -> list[dict]:
    """Run the suite on `df` through a GX checkpoint; one plain dict per expectation."""
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    ctx = gx.get_context(mode="ephemeral")
    ctx.variables.progress_bars = ProgressBarsConfig(globally=False)
    actions = []
    if docs is not None:
        ctx.add_data_docs_site(site_name="slq", site_config={
            "class_name": "SiteBuilder",
            "store_backend": {"class_name": "TupleFilesystemStoreBackend", "base_directory": str(docs)},
            "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
        })
        actions.append(gx.checkpoint.UpdateDataDocsAction(name="data_docs", site_names=["slq"]))
    asset = ctx.data_sources.add_pandas("slq").add_dataframe_asset("manifest")
    batch = asset.add_batch_definition_whole_dataframe("all")
    suite = ctx.suites.add(gx.ExpectationSuite(name="manifest", expectations=expectations))
    vd = ctx.validation_definitions.add(gx.ValidationDefinition(name="manifest", data=batch, suite=suite))
    checkpoint = ctx.checkpoints.add(gx.Checkpoint(
        name="validate", validation_definitions=[vd], actions=actions,
        result_format={"result_format": "COMPLETE", "unexpected_index_column_names": ["id"]}))
    run = checkpoint.run(batch_parameters={"dataframe": df})
    return [_result(r, examples) for vr in run.run_results.values() for r in vr.results]


def _result(r, examples: int) -> dict:
    """One expectation's outcome: what was checked, how many rows failed, and a few of them."""
    conf, res = r.expectation_config, r.result or {}
    column = conf.kwargs.get("column")
    out = {
        "expectation": conf.type,
        "column": column,
        "kwargs": {k: _plain(x) for k, x in sorted(conf.kwargs.items()) if k not in ("column", "batch_id")},
        "success": bool(r.success),
        "unexpected_count": int(res.get("unexpected_count", 0) or 0),
        "examples": [{"id": _plain(e.get("id")), "value": _plain(e.get(column, e.get("id")))}
                     for e in (res.get("unexpected_index_list") or [])[:examples]],
        "fix": conf.meta.get("fix") if conf.meta else None,
    }
    if "observed_value" in res:
        out["observed_value"] = _plain(res["observed_value"])
    info = r.exception_info or {}
    if info.get("raised_exception"):
        out["error"] = info.get("exception_message")
    elif any(isinstance(x, dict) and x.get("raised_exception") for x in info.values()):  # per-metric errors
        out["error"] = "; ".join(str(x.get("exception_message")) for x in info.values()
                                 if isinstance(x, dict) and x.get("raised_exception"))
    return out


def _counts(df: pd.DataFrame) -> dict:
    splits = {s: {"rows": int((df["split"] == s).sum()), "images": int(df.loc[df["split"] == s, "image_id"].nunique())}
              for s in sorted(set(df["split"]) - {None}, key=str)}
    return {"n_rows": len(df), "n_images": int(df["image_id"].nunique()), "splits": splits}


def _failure_message(report: dict, path: Path) -> str:
    failed = [r for r in report["expectations"] if not r["success"]]
    lines = [f"data validation failed: {len(failed)} of {len(report['expectations'])} expectations "
             f"on {report['manifest']} (full report: {path})"]
    for r in failed:
        name = f"{r['expectation']}({r['column']})" if r["column"] else r["expectation"]
        what = r.get("error") or f"{r['unexpected_count']} row(s)"
        lines.append(f"- {name}: {what}")
        lines += [f"    id={e['id']!r} value={e['value']!r}" for e in r["examples"]]
        if "observed_value" in r:
            lines.append(f"    observed: {r['observed_value']!r}")
        lines.append(f"    fix: {r['fix']}")
    return "\n".join(lines)


def _plain(x):
    """A JSON-safe version of a value GX or pandas handed back (numpy scalars, NaN, sets)."""
    if hasattr(x, "item") and not isinstance(x, (list, dict)):
        x = x.item()
    if isinstance(x, float) and math.isnan(x):
        return None
    if isinstance(x, (list, tuple, set)):
        return [_plain(y) for y in x]
    return x if isinstance(x, (str, int, float, bool, type(None), dict)) else str(x)
