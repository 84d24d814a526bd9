"""One self-contained HTML page of a pipeline run's results, readable with no network.

`dvc plots show` loads Vega from a CDN and GX Data Docs load their styles and scripts from the
web, so offline both render blank. This page holds everything itself: plots are inline SVG drawn
by matplotlib (text as paths, no fonts to fetch), styles sit in one <style> block, and there is
no script. Sections, each built from the files the stages write:

- training loss: `train.history` (SLQ) and `pretrain.history` (the built-in backbone), per step;
- recall@k: `evaluate.plots` (the embed stage's split) and every `<evaluate.report_dir>/curves/*.csv`
  (one per benchmark), with the headline numbers of `evaluate.metrics`;
- methods compared: the compare stage's `methods.report` (markdown, rendered here) and a t2i R@1
  chart from its `metrics/compare.json` (or, without it, `methods.metrics/*.json`: no SLQ row);
- data validation: every expectation of `validate.report` (or of `<stem>.failed.json` beside it,
  which the validate stage writes instead when the data fails), its outcome, counts, failing rows.

An input that is missing or unreadable becomes a line saying so; the page is always written.
"""

from __future__ import annotations

import csv
import html
import io
import json
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

from slq.io import write_text_atomic

TITLE = "slq pipeline report"


@dataclass
class ReportInputs:
    """Where each section's files are; None (or a missing file) skips that part with a note."""

    train_history: Path | None = None  # step,loss,... (SLQ training)
    pretrain_history: Path | None = None  # step,loss,... (the built-in backbone's pretraining)
    recall_at_k: Path | None = None  # k,t2i,i2t (evaluate stage, the embedded split)
    curves_dir: Path | None = None  # <benchmark>.csv files: k,<curve>,...
    eval_metrics: Path | None = None  # metrics/eval.json
    methods_report: Path | None = None  # reports/methods.md
    compare_metrics: Path | None = None  # metrics/compare.json: {method: {budget, <benchmark>: metrics}}
    methods_dir: Path | None = None  # metrics/methods/<method>.json
    validate: Path | None = None  # reports/validate.json (validate.failed.json beside it wins)
    root: Path | None = None  # paths are shown relative to it (the project folder)
    reference: str | None = None  # the method shown first (train.method: the one the others are compared with)
    sources: list[str] = field(default_factory=list)  # filled while rendering: what was read

    def shown(self, path) -> str:
        """`path` as the page names it: relative to `root` when inside it."""
        if path is None:
            return "(not configured)"
        if self.root is not None:
            try:
                return Path(path).resolve().relative_to(Path(self.root).resolve()).as_posix()
            except ValueError:
                pass
        return str(path)

    @classmethod
    def from_config(cls, cfg, **paths) -> ReportInputs:
        """The paths a `slq.mlops.config.Config` gives the stages; `paths` adds or replaces some (the
        compare stage gives `compare_metrics`, a path of its own)."""
        return replace(cls(
            train_history=cfg.path(cfg.train.history),
            pretrain_history=cfg.path(cfg.pretrain.history),
            recall_at_k=cfg.path(cfg.evaluate.plots),
            curves_dir=cfg.path(cfg.evaluate.report_dir) / "curves",
            eval_metrics=cfg.path(cfg.evaluate.metrics),
            methods_report=cfg.path(cfg.methods.report),
            methods_dir=cfg.path(cfg.methods.metrics),
            validate=cfg.path(cfg.validate.report),
            root=Path(cfg.root),
            reference=cfg.train.method,
        ), **paths)


def write_report(out: str | Path, inputs: ReportInputs, title: str = TITLE) -> Path:
    """Write the whole report to `out` (atomically); returns its path."""
    return write_text_atomic(Path(out), render_report(inputs, title))


def render_report(inputs: ReportInputs, title: str = TITLE) -> str:
    sections = [
        ("Training loss", _loss_section(inputs)),
        ("Recall@k", _recall_section(inputs)),
        ("Methods compared", _methods_section(inputs)),
        ("Data validation", _validation_section(inputs)),
    ]
    toc = "".join(f'<li><a href="#{_anchor(name)}">{name}</a></li>' for name, _ in sections)
    body = "".join(f'<section id="{_anchor(name)}"><h2>{name}</h2>{content}</section>' for name, content in sections)
    read = "".join(f"<li><code>{_e(s)}</code></li>" for s in inputs.sources) or "<li>nothing</li>"
    return _page(title, f"<nav><ul>{toc}</ul></nav>{body}<section><h2>Files read</h2><ul>{read}</ul></section>")


def write_validation_page(out: str | Path, report: dict, title: str = "Data validation") -> Path:
    """The validate stage's expectations table on its own page (`report`: what validate.json holds)."""
    return write_text_atomic(Path(out), _page(title, validation_html(report)))


# ---- sections ------------------------------------------------------------------------------------
def _loss_section(inputs: ReportInputs) -> str:
    parts = []
    for label, path in (("SLQ training", inputs.train_history), ("backbone pretraining", inputs.pretrain_history)):
        table = _read(inputs, path, _read_csv)
        if isinstance(table, Note):
            parts.append(table)
            continue
        steps, loss = _xy(table, "step", "loss")
        if not loss:
            parts.append(_note(f"{inputs.shown(path)}: no `step,loss` rows"))
            continue
        parts.append(_figure(line_plot({"loss": (steps, loss)}, f"{label} loss", "step", "loss"), inputs.shown(path)))
    return "".join(parts)


def _recall_section(inputs: ReportInputs) -> str:
    parts = [_eval_table(inputs)]
    table = _read(inputs, inputs.recall_at_k, _read_csv)
    if isinstance(table, Note):
        parts.append(table)
    else:
        parts.append(_figure(_curve_plot(table, "evaluate split (embed stage)"), inputs.shown(inputs.recall_at_k)))
    curves = inputs.curves_dir
    files = sorted(curves.glob("*.csv")) if curves is not None and curves.is_dir() else []
    if not files:
        where = inputs.shown(curves) if curves is not None else "not configured"
        parts.append(_note(f"no benchmark curves: {where} holds no .csv (evaluate stage)"))
    for path in files:
        table = _read(inputs, path, _read_csv)
        parts.append(table if isinstance(table, Note) else _figure(_curve_plot(table, path.stem), inputs.shown(path)))
    return "".join(parts)


def _eval_table(inputs: ReportInputs) -> str:
    ev = _read(inputs, inputs.eval_metrics, _read_json)
    if isinstance(ev, Note):
        return ev
    split = "evaluate split" + (f" ({ev['n_images']:,} images, {ev['n_texts']:,} texts)"
                                if _is_number(ev.get("n_images")) and _is_number(ev.get("n_texts")) else "")
    rows = [(split, {k: v for k, v in ev.items() if _is_number(v) and k not in ("n_images", "n_texts")})]
    rows += [(name, {k: v for k, v in ms.items() if _is_number(v)})
             for name, ms in (ev.get("benchmarks") or {}).items() if isinstance(ms, dict)]
    cols = sorted({k for _, ms in rows for k in ms}, key=_metric_order)
    head = "".join(f'<th class="num">{_e(c)}</th>' for c in cols)
    body = "".join(f"<tr><td>{_e(name)}</td>" + "".join(f'<td class="num">{_num(ms.get(c))}</td>' for c in cols)
                   + "</tr>" for name, ms in rows)
    gap = ev.get("modality_gap")
    gap = (f"<p>modality gap (mean image - mean text): {', '.join(f'{_e(k)} {_num(v)}' for k, v in gap.items())}</p>"
           if isinstance(gap, dict) else "")
    return f"<table><tr><th>{_e(inputs.shown(inputs.eval_metrics))}</th>{head}</tr>{body}</table>{gap}"


def _metric_order(name: str) -> tuple:
    """t2i_R@1, t2i_R@5, t2i_R@10, i2t_R@..., R@..., then the rest by name."""
    m = re.fullmatch(r"(?:(t2i|i2t)_)?R@(\d+)", name)
    if m is None:
        return (3, 0, name)
    return ({"t2i": 0, "i2t": 1}.get(m.group(1), 2), int(m.group(2)), name)


def _methods_section(inputs: ReportInputs) -> str:
    parts = []
    md = _read(inputs, inputs.methods_report, lambda p: p.read_text(encoding="utf-8"))
    parts.append(md if isinstance(md, Note) else markdown_html(re.sub(r"\A# [^\n]*\n+", "", md)))  # (its title)
    got = _method_rows(inputs)
    if isinstance(got, Note):
        parts.append(got)
    elif got[0]:
        parts.append(_figure(_methods_chart(got[0]), inputs.shown(got[1])))
    return "".join(parts)


def _method_rows(inputs: ReportInputs) -> tuple[dict, Path] | Note:
    """({method: {benchmark: metrics}}, where they came from): compare.json (the reference first), else each
    method's own metrics file."""
    if inputs.compare_metrics is not None and inputs.compare_metrics.is_file():
        data = _read(inputs, inputs.compare_metrics, _read_json)
        if isinstance(data, Note):
            return data
        return {m: {b: ms for b, ms in r.items() if b != "budget" and isinstance(ms, dict)}
                for m, r in sorted(data.items(), key=lambda kv: kv[0] != inputs.reference) if isinstance(r, dict)}, \
            inputs.compare_metrics
    d = inputs.methods_dir
    files = sorted(d.glob("*.json")) if d is not None and d.is_dir() else []
    files = [f for f in files if not f.name.endswith(".train.json")]
    if not files:
        return _note(f"no methods metrics: neither {inputs.shown(inputs.compare_metrics)} nor "
                     f"{inputs.shown(d)}/*.json (compare and methods stages)")
    rows = {}
    for f in files:
        data = _read(inputs, f, _read_json)
        if isinstance(data, Note):
            return data
        rows[f.stem] = data.get("benchmarks") or {}
    return rows, d


def _validation_section(inputs: ReportInputs) -> str:
    path = inputs.validate
    if path is not None:
        failed = path.with_suffix(".failed.json")
        if failed.is_file():  # written instead of the report when the data fails (and removed when it passes)
            path = failed
    report = _read(inputs, path, _read_json)
    return report if isinstance(report, Note) else validation_html(report, inputs.shown(path))


def validation_html(report: dict, source: str | None = None) -> str:
    """Summary, then one table row per expectation: outcome, counts, failing rows, what to fix."""
    exps = [e for e in report.get("expectations") or [] if isinstance(e, dict)]
    failed = [e for e in exps if not e.get("success")]
    if report.get("success") and not failed:
        verdict = f'<p class="ok">PASSED: all {len(exps)} expectations hold.</p>'
    else:
        names = ", ".join(_e(_exp_name(e)) for e in failed) or "see below"
        verdict = f'<p class="fail">FAILED: {len(failed)} of {len(exps)} expectations: {names}.</p>'
    facts = [("manifest", report.get("manifest")), ("rows", report.get("n_rows")), ("images", report.get("n_images"))]
    facts += [(f"split {s}", f"{c.get('rows')} rows, {c.get('images')} images")
              for s, c in (report.get("splits") or {}).items() if isinstance(c, dict)]
    facts += [("images sha256", report.get("images_sha256")), ("GX Data Docs", report.get("data_docs"))]
    summary = "".join(f"<li>{_e(k)}: <code>{_e(v)}</code></li>" for k, v in facts if v is not None)
    if source:
        summary += f"<li>results: <code>{_e(source)}</code></li>"
    head = ("<tr><th>expectation</th><th>column</th><th>arguments</th><th>result</th><th>failing rows</th>"
            "<th>observed</th><th>examples of failures</th><th>fix</th></tr>")
    rows = []
    for e in exps:
        ok = bool(e.get("success"))
        examples = "<br>".join(f"id={_e(_value(x.get('id')))}: <code>{_e(_value(x.get('value')))}</code>"
                               for x in e.get("examples") or [] if isinstance(x, dict))
        if e.get("error"):
            examples = f"error: {_e(e['error'])}" + (f"<br>{examples}" if examples else "")
        kwargs = ", ".join(f"{_e(k)}={_e(_value(v))}" for k, v in (e.get("kwargs") or {}).items())
        rows.append(f'<tr class="{"ok" if ok else "fail"}"><td>{_e(e.get("expectation"))}</td>'
                    f'<td>{_e(e.get("column") or "")}</td><td>{kwargs}</td><td>{"pass" if ok else "FAIL"}</td>'
                    f'<td class="num">{_e(e.get("unexpected_count", 0))}</td>'
                    f'<td>{_e(_value(e["observed_value"])) if "observed_value" in e else ""}</td>'
                    f'<td>{examples}</td><td>{"" if ok else _e(e.get("fix") or "")}</td></tr>')
    return f"{verdict}<ul>{summary}</ul><table>{head}{''.join(rows)}</table>"


def _exp_name(e: dict) -> str:
    return f"{e.get('expectation')}({e['column']})" if e.get("column") else str(e.get("expectation"))


# ---- plots ---------------------------------------------------------------------------------------
def line_plot(series: dict[str, tuple[list, list]], title: str, xlabel: str, ylabel: str,
              ylim: tuple[float, float] | None = None) -> str:
    """Lines (label -> (x, y)) as an inline <svg> element."""
    from matplotlib.backends.backend_svg import FigureCanvasSVG
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.2, 3.2), dpi=100)
    FigureCanvasSVG(fig)
    ax = fig.add_subplot()
    for label, (x, y) in series.items():
        ax.plot(x, y, label=label, linewidth=1.2)
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    if ylim is not None:
        ax.set_ylim(*ylim)
    ax.grid(alpha=0.3)
    if len(series) > 1:
        ax.legend()
    fig.tight_layout()
    return _svg(fig)


def _curve_plot(table: list[dict], title: str) -> str:
    series = {}
    for name in (c for c in (table[0] if table else {}) if c != "k"):
        ks, vals = _xy(table, "k", name)  # a shorter curve leaves its cells empty
        if vals:
            series[name] = (ks, vals)
    if not series:
        return _note(f"{title}: no curve values")
    return line_plot(series, f"recall@k: {title}", "k", "recall", ylim=(0, 1.02))


def _methods_chart(rows: dict[str, dict]) -> str:
    """Grouped bars: t2i R@1 of each method on each benchmark."""
    from matplotlib.backends.backend_svg import FigureCanvasSVG
    from matplotlib.figure import Figure

    benches = list(dict.fromkeys(b for r in rows.values() for b in r))
    fig = Figure(figsize=(5.2 + 0.4 * len(rows), 3.2), dpi=100)
    FigureCanvasSVG(fig)
    ax = fig.add_subplot()
    width = 0.8 / max(1, len(benches))
    for i, b in enumerate(benches):
        vals = [float((rows[m].get(b) or {}).get("t2i_R@1") or 0.0) for m in rows]
        ax.bar([j + (i - (len(benches) - 1) / 2) * width for j in range(len(rows))], vals, width, label=b)
    ax.set_xticks(range(len(rows)), list(rows))
    ax.set(title="t2i R@1 by method", ylabel="t2i R@1")
    ax.grid(axis="y", alpha=0.3)
    if benches:
        ax.legend()
    fig.tight_layout()
    return _svg(fig)


def _svg(fig) -> str:
    """The figure as an <svg> element to inline in HTML: no XML prolog, DOCTYPE, namespaces or
    metadata (an HTML parser needs none), text as <text> in the reader's own sans-serif font, and
    ids made unique on the page (several figures share a document)."""
    import hashlib

    import matplotlib

    buf = io.StringIO()
    rc = {"svg.hashsalt": "slq-report", "svg.fonttype": "none", "font.sans-serif": ["DejaVu Sans", "Arial"]}
    with matplotlib.rc_context(rc):
        fig.savefig(buf, format="svg", metadata={"Date": None, "Creator": None, "Format": None, "Type": None})
    text = buf.getvalue()
    text = re.sub(r'\s+xmlns(:\w+)?="[^"]*"', "", text[text.index("<svg"):])
    scope = "f" + hashlib.sha256(text.encode()).hexdigest()[:8] + "-"
    text = re.sub(r'\bid="([^"]+)"', rf'id="{scope}\1"', text)
    text = re.sub(r'href="#([^"]+)"', rf'href="#{scope}\1"', text)
    return re.sub(r"url\(#([^)]+)\)", rf"url(#{scope}\1)", text)


def _figure(content: str, source) -> str:
    return f'<figure>{content}<figcaption><code>{_e(source)}</code></figcaption></figure>'


# ---- a little markdown (what the compare stage writes: headings, tables, bullets) ---------------
def markdown_html(text: str) -> str:
    out, table, bullets = [], [], []

    def flush():
        if table:
            out.append(_md_table(table))
            table.clear()
        if bullets:
            out.append("<ul>" + "".join(f"<li>{_inline(b)}</li>" for b in bullets) + "</ul>")
            bullets.clear()

    for line in text.splitlines():
        s = line.strip()
        if s.startswith("|"):
            if bullets:
                flush()
            table.append(s)
            continue
        if s.startswith("- "):
            if table:
                flush()
            bullets.append(s[2:])
            continue
        flush()
        if s.startswith("#"):
            level = min(6, len(s) - len(s.lstrip("#")) + 2)  # "# x" under the page's h2: h3
            out.append(f"<h{level}>{_inline(s.lstrip('#').strip())}</h{level}>")
        elif s:
            out.append(f"<p>{_inline(s)}</p>")
    flush()
    return "".join(out)


def _md_table(lines: list[str]) -> str:
    rows = [[c.strip() for c in ln.strip().strip("|").split("|")] for ln in lines]
    sep = rows[1] if len(rows) > 1 and all(re.fullmatch(r":?-+:?", c) for c in rows[1] if c) else None
    right = [c.endswith(":") for c in sep] if sep else []
    body = rows[2:] if sep else rows[1:]

    def cell(tag, c, i):
        cls = ' class="num"' if i < len(right) and right[i] else ""
        return f"<{tag}{cls}>{_inline(c)}</{tag}>"

    head = "<tr>" + "".join(cell("th", c, i) for i, c in enumerate(rows[0])) + "</tr>"
    return "<table>" + head + "".join("<tr>" + "".join(cell("td", c, i) for i, c in enumerate(r)) + "</tr>"
                                      for r in body) + "</table>"


def _inline(s: str) -> str:
    s = _e(s)
    s = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", s)
    s = re.sub(r"(?<!\w)_(.+?)_(?!\w)", r"<em>\1</em>", s)
    return re.sub(r"`(.+?)`", r"<code>\1</code>", s)


# ---- reading -------------------------------------------------------------------------------------
class Note(str):
    """HTML of a line saying why a part of the page is missing (stands where the part would be)."""


def _read(inputs: ReportInputs, path: Path | None, reader):
    """reader(path), or a Note saying why there is nothing: never an exception."""
    if path is None:
        return _note("not configured")
    if not Path(path).is_file():
        return _note(f"not available: {inputs.shown(path)} (not written yet: run the stage that makes it)")
    try:
        value = reader(Path(path))
    except Exception as e:  # noqa: BLE001 - a damaged input loses its part of the page, not the page
        return _note(f"could not read {inputs.shown(path)}: {type(e).__name__}: {e}")
    inputs.sources.append(inputs.shown(path))
    return value


def _read_csv(path: Path) -> list[dict]:
    with path.open(newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _read_json(path: Path):
    data = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(data, dict):
        raise TypeError(f"expected a JSON object, found {type(data).__name__}")
    return data


def _xy(table: list[dict], x: str, y: str) -> tuple[list[float], list[float]]:
    """The (x, y) numbers of the rows that have both."""
    xs, ys = [], []
    for row in table:
        try:
            a, b = float(row.get(x)), float(row.get(y))
        except (TypeError, ValueError):
            continue
        xs.append(a)
        ys.append(b)
    return xs, ys


# ---- html ----------------------------------------------------------------------------------------
STYLE = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; color: #222;
       max-width: 1200px; margin: 1.5em auto; padding: 0 1em; }
h1 { font-size: 1.6em; } h2 { border-bottom: 1px solid #ccc; padding-bottom: .2em; margin-top: 1.6em; }
nav ul { list-style: none; padding: 0; display: flex; gap: 1.2em; }
table { border-collapse: collapse; margin: .8em 0; font-size: 13px; }
th, td { border: 1px solid #ccc; padding: .25em .5em; text-align: left; vertical-align: top; }
th { background: #f3f3f3; } td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
tr.fail td { background: #fde8e8; } tr.ok td:nth-child(4) { color: #17692b; }
p.fail { color: #a40000; font-weight: bold; } p.ok { color: #17692b; font-weight: bold; }
p.missing { color: #777; font-style: italic; }
figure { display: inline-block; margin: .5em 1em .5em 0; vertical-align: top; }
figure svg { max-width: 100%; height: auto; } figcaption { font-size: 12px; color: #555; }
code { background: #f5f5f5; padding: 0 .2em; word-break: break-all; }
"""


def _page(title: str, body: str) -> str:
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{_e(title)}</title>'
            f"<style>{STYLE}</style></head><body><h1>{_e(title)}</h1>{body}</body></html>\n")


def _note(text: str) -> Note:
    return Note(f'<p class="missing">{_e(text)}</p>')


def _e(x) -> str:
    return html.escape("" if x is None else str(x))


def _anchor(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def _value(v) -> str:
    """A value from a JSON file as written there (lists and objects as JSON, strings as they are)."""
    return json.dumps(v, default=str) if isinstance(v, (list, dict)) else str(v)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _num(v) -> str:
    if not _is_number(v):
        return ""
    return f"{v:.3f}" if isinstance(v, float) else f"{v:,}"
