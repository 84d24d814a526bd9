"""Data validation: the manifest and its images checked with a Great Expectations suite.

Training on broken data fails late and silently (a missing image crashes step 900, a test image
seen in training inflates recall), so this stage runs first and stops the pipeline with a message
that says what is wrong, on which rows, and what to fix.

Per-row facts GX cannot see (does the file exist, does it decode, is it shared between train and
an eval split) are computed in pandas as derived columns that hold the offending value, or null
when the row is fine; the suite then checks them alongside the plain manifest columns.

A leak is an eval-split row whose image train also uses: the same `image_id`, the same file path,
or a file with the same bytes under another name (sha256; e.g. COCO 2017's train2017/<id>.jpg is
val2014/COCO_val2014_<id>.jpg, for most Karpathy test images). Every image is read once, in a
few threads, for its hash and a full decode; the results are cached by (path, size, mtime) in
`validate.cache`, so re-validating ~123K COCO images reads only new or changed files.

The report is written only when the data passes, so downstream stages (and DVC) never see a
report for bad data; a failing run writes `<report stem>.failed.json` next to it instead.
`<report stem>.html` shows the same results (every expectation, failing rows, fixes) on a page that
needs no network; a failing run's page is `<report stem>.failed.html`, and the Data Docs, too, are
replaced only when the data passes (slq.mlops.stages.validate): a failed run leaves the last good
validation's outputs as they were.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import stat
from pathlib import Path
from typing import TYPE_CHECKING

from slq.io import file_sha256
from slq.mlops.config import ValidateConfig
from slq.progress import bar as progress_bar

if TYPE_CHECKING:  # pandas and PIL load when the stage runs, not with the CLI
    import pandas as pd


COLUMNS = ("id", "image_id", "image", "caption", "split")


class ValidationFailed(Exception):
    """The data broke at least one expectation; `report` holds the full results."""

    def __init__(self, message: str, report: dict, report_path: Path):
        super().__init__(message)
        self.report = report
        self.report_path = report_path


def build_frame(rows: list[dict], root: Path, v: ValidateConfig, cache: Path | None = None,
                stats: dict | None = None, progress: bool = True) -> pd.DataFrame:
    """The manifest as a DataFrame plus derived columns, each the offending value or None.

    image_missing: the image path when the file does not exist; image_error: why an existing
    file does not decode; leak: which train image an eval-split row reuses (by id, path or bytes).
    `stats` receives how many files were read and cached, and a digest of every image's sha256.
    """
    import pandas as pd

    df = pd.DataFrame(rows)
    for c in COLUMNS:
        if c not in df:
            df[c] = None
    df = df.astype(object).where(df.notna(), None)
    ids, splits, row_ids = df["image_id"].tolist(), df["split"].tolist(), df["id"].tolist()
    norm = [os.path.normpath(p) if isinstance(p, str) else None for p in df["image"]]
    facts = inspect_images(sorted(set(norm) - {None}), Path(root), cache, progress, stats)
    df["image_missing"] = [p if p and facts[p][0] == "missing" else None for p in norm]
    df["image_error"] = [facts[p][0] if p and facts[p][0] not in (None, "missing") else None for p in norm]
    df["leak"] = find_leaks(ids, norm, splits, row_ids, {p: f[1] for p, f in facts.items()}, v.eval_splits)
    if stats is not None:
        digest = hashlib.sha256("".join(f"{p}\t{f[1]}\n" for p, f in sorted(facts.items())).encode())
        stats["images_sha256"] = digest.hexdigest()
    return df


def find_leaks(ids: list, paths: list, splits: list, row_ids: list, sha: dict, eval_splits) -> list[str | None]:
    """Per row: None, or for an eval-split row what it shares with train: the image id, the image
    path, or (under another name) the image's bytes, naming the train image and row."""
    train_ids, train_paths, train_bytes = set(), set(), {}
    for image_id, path, split, row_id in zip(ids, paths, splits, row_ids):
        if split == "train":
            train_ids.add(None if image_id is None else str(image_id))
            train_paths.add(path)
            if sha.get(path):
                train_bytes.setdefault(sha[path], (path, row_id))
    train_ids.discard(None)
    train_paths.discard(None)

    def leak(image_id, path, split):
        if split not in eval_splits:
            return None
        shared = [f"image_id {image_id}"] if image_id is not None and str(image_id) in train_ids else []
        shared += [f"image {path}"] if path in train_paths else []
        if shared:
            return " and ".join(shared) + " also used by train"
        if sha.get(path) in train_bytes:
            other, row_id = train_bytes[sha[path]]
            return f"image {path} has the same bytes as train image {other} (row {row_id!r})"
        return None

    return [leak(*row) for row in zip(ids, paths, splits)]


CACHE_TABLE = "images_v1"  # bump when what is cached (the decode check) changes


def inspect_images(paths: list[str], root: Path, cache: Path | None = None, progress: bool = True,
                   stats: dict | None = None) -> dict[str, tuple[str | None, str | None]]:
    """{path: (problem, sha256)} for each image path under `root`: problem is None, 'missing' or why
    the file does not decode. Files are read in threads (hashing and decoding release the GIL);
    results are cached in the sqlite file `cache` by (absolute path, size, mtime)."""
    from concurrent.futures import ThreadPoolExecutor

    known = _cache_load(cache)
    fresh: list[tuple] = []
    out: dict[str, tuple[str | None, str | None]] = {}

    def one(p: str):
        full = os.path.abspath(root / p)
        try:
            st = os.stat(full)
        except OSError:
            return p, ("missing", None), None
        if not stat.S_ISREG(st.st_mode):
            return p, ("missing", None), None
        hit = known.get(full)
        if hit is not None and hit[:2] == (st.st_size, st.st_mtime_ns):
            return p, hit[2:], None
        fact = _image_problem(Path(full)), file_sha256(full)
        return p, fact, (full, st.st_size, st.st_mtime_ns, *fact)

    workers = min(16, 2 * (os.cpu_count() or 1))
    bar = progress_bar(len(paths), "validate images", progress and len(paths) >= 1000, unit="image",
                       mininterval=2.0)
    with ThreadPoolExecutor(workers) as pool:
        for p, fact, row in pool.map(one, paths):
            out[p] = fact
            if row is not None:
                fresh.append(row)
                if len(fresh) % 5000 == 0:  # an interrupted run keeps what it read
                    _cache_save(cache, fresh[-5000:])
            bar.update(1)
    bar.close()
    _cache_save(cache, fresh[len(fresh) - len(fresh) % 5000:])
    cached = sum(1 for f in out.values() if f[0] != "missing") - len(fresh)
    if stats is not None:
        stats.update(files=len(paths), read=len(fresh), cached=cached)
    if progress and len(paths) >= 1000:
        print(f"validate: {len(paths)} image files, {len(fresh)} read, {cached} from the cache ({cache})", flush=True)
    return out


def _cache_load(cache: Path | None) -> dict:
    """{absolute path: (size, mtime_ns, problem, sha256)} from the cache file; {} if none or unreadable."""
    if cache is None or not cache.is_file():
        return {}
    import sqlite3

    try:
        with sqlite3.connect(cache) as db:
            rows = db.execute(f"SELECT path, size, mtime_ns, problem, sha256 FROM {CACHE_TABLE}").fetchall()
    except sqlite3.Error:  # an old or broken cache is only a slower run
        return {}
    return {r[0]: tuple(r[1:]) for r in rows}


def _cache_save(cache: Path | None, rows: list[tuple]) -> None:
    if cache is None or not rows:
        return
    import sqlite3
    import warnings

    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        with sqlite3.connect(cache) as db:
            db.execute(f"CREATE TABLE IF NOT EXISTS {CACHE_TABLE} (path TEXT PRIMARY KEY, size INTEGER, "
                       "mtime_ns INTEGER, problem TEXT, sha256 TEXT)")
            db.executemany(f"INSERT OR REPLACE INTO {CACHE_TABLE} VALUES (?, ?, ?, ?, ?)", rows)
    except (sqlite3.Error, OSError) as e:
        warnings.warn(f"validate.cache {cache}: not written ({e}); the next run reads every image again",
                      stacklevel=2)


def _image_problem(path: Path) -> str | None:
    """An error message if the file does not decode, or None when it is a good image."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.verify()  # checks the structure (chunk CRCs for PNG) ...
        with Image.open(path) as im:
            im.load()  # ... and this decodes every pixel (catches truncation)
    except Exception as e:  # PIL raises many kinds: OSError, SyntaxError, ValueError, ...
        return f"{type(e).__name__}: {e}"
    return None


def expectations(v: ValidateConfig) -> list:
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
        gxe.ExpectColumnValuesToMatchRegex(
            column="caption", regex=r"\S",
            meta={"fix": "fix or drop captions made only of spaces, tabs or newlines"}),
        gxe.ExpectColumnValuesToBeInSet(
            column="split", value_set=list(v.splits),
            meta={"fix": f"use one of {list(v.splits)} as `split` (or change validate.splits)"}),
        gxe.ExpectColumnValuesToBeNull(
            column="image_missing", meta={"fix": "add the missing image files under data.root or drop their rows"}),
        gxe.ExpectColumnValuesToBeNull(
            column="image_error", meta={"fix": "replace the corrupt image files (PIL cannot decode them)"}),
        gxe.ExpectColumnValuesToBeNull(
            column="leak", meta={"fix": f"an image of {list(v.eval_splits)} is also trained on: drop those rows "
                                        "or move the image out of train. COCO: train on Karpathy train+restval "
                                        "only (`slq data coco` builds that manifest); COCO 2017 train holds most "
                                        "Karpathy test images"}),
    ]


def check(df: pd.DataFrame, expectations: list, docs: Path | None, examples: int) -> list[dict]:
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
        "examples": _examples(res.get("unexpected_index_list") or [], column, examples),
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


def _examples(unexpected: list, column: str | None, n: int) -> list[dict]:
    """The first `n` failing rows with distinct values (not five captions of one leaked image)."""
    out, seen = [], set()
    for e in unexpected:
        value = _plain(e.get(column, e.get("id")))
        key = json.dumps(value, sort_keys=True, default=str)
        if key not in seen:
            seen.add(key)
            out.append({"id": _plain(e.get("id")), "value": value})
            if len(out) == n:
                break
    return out


def counts(df: pd.DataFrame) -> dict:
    splits = {s: {"rows": int((df["split"] == s).sum()), "images": int(df.loc[df["split"] == s, "image_id"].nunique())}
              for s in sorted(set(df["split"]) - {None}, key=str)}
    return {"n_rows": len(df), "n_images": int(df["image_id"].nunique()), "splits": splits}


def failure_message(report: dict, path: Path, page: Path | None = None) -> str:
    failed = [r for r in report["expectations"] if not r["success"]]
    on_page = f"; on one page: {page}" if page else ""
    lines = [f"data validation failed: {len(failed)} of {len(report['expectations'])} expectations "
             f"on {report['manifest']} (full report: {path}{on_page})"]
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
