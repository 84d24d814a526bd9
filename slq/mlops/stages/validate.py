"""Validate stage: check the manifest and its images (slq.mlops.validation); write the report, or
stop the pipeline with what is wrong, on which rows, and what to fix. A failed run keeps every
earlier output and puts the data pin back on the last validated data (slq.mlops.lineage).

Its outputs (the report, its page, the Data Docs) are built aside and replace the old ones only
when the data passes; a failed run writes its own report and page beside them instead
(`<stem>.failed.json`, `<stem>.failed.html`), so after `dvc checkout data.dvc` the stage's outputs
still match dvc.lock."""

from __future__ import annotations

import contextlib
import os

from slq.data import load_manifest
from slq.io import staged_dir, write_json_atomic
from slq.mlops.config import Config
from slq.mlops.datasets import ensure_data
from slq.mlops.lineage import restore_pin
from slq.mlops.validation import ValidationFailed, check, counts, expectations, failure_message, build_frame


def run(cfg: Config) -> dict:
    """Validate the manifest at `data.root`; write the report, or raise `ValidationFailed`."""
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    v = cfg.validate
    root = ensure_data(cfg)  # the built-in world is generated when missing (data.builtin)
    cache = cfg.path(v.cache) if v.cache else None
    stats: dict = {}
    df = build_frame(load_manifest(root, cfg.data.manifest), root, v, cache=cache, stats=stats)
    docs = cfg.path(v.data_docs) if v.data_docs else None
    path = cfg.path(v.report)
    failed_path = path.with_suffix(".failed.json")
    failed_page = path.with_suffix(".failed.html")
    # The expectations table on one self-contained page (GX Data Docs render blank offline): beside
    # the report, or beside the last good one when the data fails: it is where a failure is read.
    from slq.mlops.report import write_validation_page

    # The Data Docs are built in a fresh folder, swapped in only when the data passes.
    with staged_dir(docs) if docs else contextlib.nullcontext(None) as docs_tmp:
        results = check(df, expectations(v), docs_tmp, v.examples)
        success = all(r["success"] for r in results)
        report = {
            "success": success,
            "manifest": f"{cfg.data.root}/{cfg.data.manifest}",
            **counts(df),
            "images_sha256": stats.get("images_sha256"),  # pins the bytes of every image (DVC tracks only the manifest)
            "expectations": results,
            "data_docs": f"{v.data_docs}/index.html" if docs else None,
        }
        title = f"Data validation: {report['manifest']}"
        if not success:
            write_json_atomic(failed_path, report)
            write_validation_page(failed_page, report, title)
            message = failure_message(report, failed_path, failed_page)
            restored = restore_pin(cfg)
            if restored:
                message += f"\n{restored}"
            raise ValidationFailed(message, report, failed_path)
    page = write_validation_page(path.with_suffix(".html"), report, title)
    write_json_atomic(path, report)
    for stale in (failed_path, failed_page):  # a stale failure report would only confuse
        stale.unlink(missing_ok=True)
    return {"success": True, **counts(df), "report": str(path), "page": str(page),
            "image_files": {k: stats[k] for k in ("files", "read", "cached")}}


