"""Benchmark results -> a markdown report, DVC metrics/plots files, and modality-gap diagnostics.

Metrics in a `Result` are fractions in [0, 1]; the report shows them as percent with one decimal,
beside the paper's number (already in percent) where the benchmark class has one. Every file is
written atomically (temporary sibling + rename), so DVC and readers never see half a report.

    out_dir/benchmarks.md          header ("Always report" facts) + one table across benchmarks
    out_dir/<name>.json            DVC metrics: the flat metrics, `partial`, hashes
    out_dir/<name>_info.json       everything else the benchmark recorded (counts, files, prompts)
    out_dir/curves/<name>.csv      DVC plots: `k,<curve>,...` recall at k = 1..K (header only if none)
    out_dir/modality_gap.json      when `gap` is given (see `modality_gap`)
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np

from slq.benchmarks.base import Result
from slq.io import write_bytes_atomic, write_json_atomic, write_text_atomic

NA = "—"
# "Always report" (docs/benchmarks-data.md): meta key -> label; absent keys print as "not recorded".
HEADER = [
    ("backbone", "Backbone"),
    ("revision", "Backbone revision"),
    ("num_queries", "N_q"),
    ("checkpoint_hash", "Checkpoint hash"),
    ("prompts", "Prompts"),
    ("image_resolution", "Image resolution limits"),
    ("caption_truncation", "Caption truncation"),
]


# ---- markdown ------------------------------------------------------------------------------
def markdown_table(results: dict[str, Result], paper: dict[str, dict] | None = None,
                   meta: dict | None = None) -> str:
    """Header block from `meta` + one table: benchmark | metric | ours (%) | paper (%) | partial.

    `paper` maps benchmark name -> {metric: percent}; None takes each registered class's `paper`.
    """
    if paper is None:
        paper = _registered_paper(results)
    lines = ["# Benchmarks", "", *_header(results, meta or {}), "",
             "| benchmark | metric | ours | paper | partial |", "|---|---|---|---|---|"]
    for name, res in results.items():
        mark = _marker(res.info)
        for metric, value in res.metrics.items():
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            ref = paper.get(name, {}).get(metric)
            lines.append(f"| {name} | {metric} | {100 * value:.1f} | "
                         f"{NA if ref is None else f'{ref:.1f}'} | {mark} |")
    return "\n".join(lines) + "\n"


def _header(results: dict[str, Result], meta: dict) -> list[str]:
    out = []
    for key, label in HEADER:
        v = meta.get(key)
        out.append(f"- {label}: {_fmt(v) if v not in (None, '') else 'not recorded'}")
    for key, v in meta.items():
        if key not in dict(HEADER) and key != "file_hashes":
            out.append(f"- {key}: {_fmt(v)}")
    hashes = {**{n: _files_hash(r.info) for n, r in results.items()}, **meta.get("file_hashes", {})}
    out.append("- Dataset file hashes: " + (", ".join(f"{n} `{h}`" for n, h in hashes.items() if h)
                                            or "not recorded"))
    for name, res in results.items():
        if res.info.get("prompts"):
            out.append(f"- {name} prompts: {_fmt(res.info['prompts'])}")
        if res.info.get("missing"):
            out.append(f"- {name} is PARTIAL: missing {', '.join(map(str, res.info['missing']))}")
        if res.info.get("subset"):
            out.append(f"- {name} ran a subset: {', '.join(map(str, res.info['subset']))}")
    return out


def _files_hash(info: dict) -> str | None:
    return info.get("files_hash") or info.get("data_hash")


def _marker(info: dict) -> str:
    if info.get("partial"):
        return "partial"
    return "subset" if info.get("subset") else ""


def _fmt(v) -> str:
    return f"`{json.dumps(v, sort_keys=True)}`" if isinstance(v, (dict, list)) else str(v)


def _registered_paper(results) -> dict[str, dict]:
    from slq.benchmarks import BENCHMARKS, load_all

    load_all()
    return {n: dict(BENCHMARKS[n].paper) for n in results if n in BENCHMARKS}


# ---- modality gap --------------------------------------------------------------------------
def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def modality_gap(img: np.ndarray, txt: np.ndarray) -> dict:
    """How far apart the two modalities sit on the unit sphere (rows are L2-normalised first).

    gap_l2: ||mean(img) - mean(txt)||; cos_within_*: mean cosine over distinct pairs of one
    modality (None with a single row); cos_between: mean cosine over all (image, text) pairs.
    """
    a, b = _unit(img), _unit(txt)  # (N_i, D), (N_t, D)
    ma, mb = a.mean(0), b.mean(0)  # (D,)

    def within(x):  # mean of x_i . x_j over i != j, from the sum vector: O(N D)
        n = len(x)
        return None if n < 2 else float((np.dot(x.sum(0), x.sum(0)) - n) / (n * (n - 1)))

    return {"gap_l2": float(np.linalg.norm(ma - mb)), "cos_within_image": within(a),
            "cos_within_text": within(b), "cos_between": float(ma @ mb), "n_image": len(a), "n_text": len(b)}


def pca_scatter_png(img: np.ndarray, txt: np.ndarray, path, title: str = "", max_points: int = 5000) -> Path:
    """Both modalities on the first two principal components of their union, as a PNG."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rng = np.random.default_rng(0)
    a, b = (x[rng.choice(len(x), max_points, replace=False)] if len(x) > max_points else x
            for x in (_unit(img), _unit(txt)))
    both = np.concatenate([a, b])  # (N, D)
    centred = both - both.mean(0)
    _, s, vt = np.linalg.svd(centred, full_matrices=False)
    xy = centred @ vt[:2].T  # (N, 2)
    if xy.shape[1] < 2:
        xy = np.pad(xy, ((0, 0), (0, 2 - xy.shape[1])))
    var = (s[:2] ** 2 / max((s ** 2).sum(), 1e-12)).tolist() + [0.0, 0.0]

    fig = Figure(figsize=(5, 5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.scatter(*xy[:len(a)].T, s=6, alpha=0.6, label=f"image ({len(a)})")
    ax.scatter(*xy[len(a):].T, s=6, alpha=0.6, label=f"text ({len(b)})")
    ax.set_xlabel(f"PC1 ({100 * var[0]:.1f}%)")
    ax.set_ylabel(f"PC2 ({100 * var[1]:.1f}%)")
    ax.set_title(title)
    ax.legend()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return write_bytes_atomic(path, buf.getvalue())


# ---- files ---------------------------------------------------------------------------------
def write_report(out_dir, results: dict[str, Result], meta: dict, gap: dict | None = None,
                 paper: dict[str, dict] | None = None) -> dict[str, Path]:
    """Write the report files (module docstring); returns {role: path}."""
    out = Path(out_dir)
    md = markdown_table(results, paper, meta)
    written = {}
    if gap is not None:
        written["modality_gap"] = write_json_atomic(out / "modality_gap.json", gap)
        md += "\n## Modality gap\n\n" + "\n".join(f"- {k}: {_num(v)}" for k, v in gap.items() if k != "plot")
        if gap.get("plot"):
            plot = Path(gap["plot"])
            rel = os.path.relpath(plot, out) if plot.is_absolute() else plot
            md += f"\n\n![PCA of image and text embeddings]({Path(rel).as_posix()})"
        md += "\n"
    written["markdown"] = write_text_atomic(out / "benchmarks.md", md)
    for name, res in results.items():
        extra = {"files_hash": _files_hash(res.info), "checkpoint_hash": meta.get("checkpoint_hash")}
        metrics = {**res.metrics, "partial": bool(res.info.get("partial")),
                   **{k: v for k, v in extra.items() if v is not None}}
        written[name] = write_json_atomic(out / f"{name}.json", metrics)
        written[f"{name}_info"] = write_json_atomic(out / f"{name}_info.json", res.info)
        written[f"{name}_recall"] = write_text_atomic(out / "curves" / f"{name}.csv", _curves_csv(res.curves))
    return written


def _num(v) -> str:
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def _curves_csv(curves: dict[str, list[float]]) -> str:
    """`k,<name>,...` rows for k = 1..longest curve; a shorter curve leaves its cells empty."""
    names = list(curves)
    depth = max((len(c) for c in curves.values()), default=0)
    rows = [",".join(["k", *names])]
    for k in range(1, depth + 1):
        cells = [f"{curves[n][k - 1]:.6f}" if k <= len(curves[n]) else "" for n in names]
        rows.append(",".join([str(k), *cells]))
    return "\n".join(rows) + "\n"
