"""`slq data`: the built-in synthetic world, the COCO training manifest, and data as users hold it
(`slq data import`: imagefolder, CSV, Parquet, WebDataset, `datasets` save_to_disk)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from slq.mlops.cli.common import ParamsOpt, SetOpt, config, console, fail, print_table, user_errors

app = typer.Typer(help="The dataset.", no_args_is_help=True)


@app.command("generate")
@user_errors
def data_generate(params: Path = ParamsOpt, set_: Optional[list[str]] = SetOpt,
                  force: bool = typer.Option(False, help="Regenerate even if the folder exists.")):
    """Write the built-in synthetic world at data.root (byte-identical for a given seed)."""
    from slq.mlops.datasets import ensure_data

    cfg = config(params, set_)
    root = ensure_data(cfg, regenerate=force)
    console().print(f"dataset at {root}")


@app.command("coco")
@user_errors
def data_coco(karpathy: Path = typer.Option(..., "--karpathy", help="Karpathy's dataset_coco.json."),
              images: Path = typer.Option(..., "--images", help="The folder holding train2014/ and val2014/."),
              out: Path = typer.Option(Path("data/coco"), "--out", help="Where manifest.jsonl goes (data.root)."),
              coco2017_train: Optional[Path] = typer.Option(
                  None, "--coco2017-train", help="captions_train2017.json: train on COCO 2017 train as the reference "
                  "code did (images under <images>/train2017). It holds most Karpathy test images: only to see "
                  "the validate stage catch the leak."),
              check: int = typer.Option(20, help="Sampled images that must exist (0: none); validate checks all.")):
    """The COCO training manifest: Karpathy train + restval -> train, val -> val, test -> test.

    slq data coco --karpathy /data/coco/dataset_coco.json --images /data/coco --out data/coco
    """
    from slq.data.coco import CocoError, build_coco_manifest

    if coco2017_train is not None:
        console().print("[bold yellow]warning:[/] train rows from COCO 2017 train: most Karpathy test images are "
                        "in it; the validate stage will fail on the leak (that is the point).")
    try:
        s = build_coco_manifest(karpathy, images, out, coco_train=coco2017_train, check=check)
    except CocoError as e:
        fail(str(e))
    print_table(str(out / s["manifest"]), [{"split": k, **v} for k, v in s["splits"].items()],
                ["split", "images", "rows"])
    console().print(f"image paths: {s['image_paths']} (images under {s['images']})", soft_wrap=True)
    console().print(f"next: data.root: {out} and data.builtin: false in params.yaml "
                    "(params/paper-qwen3-vl-4b.yaml has them), then `slq stage validate`")


@app.command("import")
@user_errors
def data_import(source: str = typer.Argument(..., help="A folder, file or brace pattern (shards-{000..009}.tar)."),
                out: Path = typer.Option(..., "--out", help="The manifest folder to write (data.root)."),
                fmt: Optional[str] = typer.Option(
                    None, "--format", help="imagefolder, csv, parquet, webdataset or hf-disk (default: guessed)."),
                image_column: Optional[str] = typer.Option(
                    None, help="The image column (default: image; hf-disk: its Image column)."),
                caption_column: Optional[str] = typer.Option(
                    None, help="The caption column or json key (default: caption, then text; imagefolder: text first)."),
                split_column: Optional[str] = typer.Option(
                    None, help="The split column (default: split when present; else splits by image hash)."),
                val: float = typer.Option(0.05, help="Fraction of images put in val when the source has no splits."),
                test: float = typer.Option(0.05, help="Fraction of images put in test when the source has no splits."),
                seed: int = typer.Option(0, help="Seed of the split hash."),
                force: bool = typer.Option(False, help="Replace an existing --out."),
                strict: bool = typer.Option(False, help="Stop at the first bad row instead of skipping it.")):
    """Data as you hold it -> a manifest folder (manifest.jsonl, images/, import.json).

    slq data import /data/pets --format imagefolder --out data/pets
    """
    from rich.markup import escape

    from slq.data.importers import import_data

    s = import_data(source, out, fmt, image_column=image_column, caption_column=caption_column,
                    split_column=split_column, val=val, test=test, seed=seed, force=force, strict=strict)
    con = console(stderr=True)
    shown = 50
    for b in s["bad"][:shown]:
        con.print(f"[yellow]skipped:[/] {escape(b['where'])}: {escape(b['problem'])}", soft_wrap=True)
    if s["n_bad"] > shown:
        con.print(f"... and {s['n_bad'] - shown} more: all in {out / 'import.json'}", soft_wrap=True)
    print_table(str(out / s["manifest"]), [{"split": k, **v} for k, v in s["splits"].items()],
                ["split", "images", "rows"])
    kinds = ", ".join(f"{n} {k}" for k, n in s["bad_by_kind"].items())
    console().print(f"{s['n_rows']} rows, {s['n_images']} images from {s['n_source_rows']} source rows; "
                    f"{s['n_bad']} bad rows skipped{f' ({kinds})' if kinds else ''}; splits from {s['splits_from']}",
                    soft_wrap=True)
    console().print(f"next: data.root: {out} and data.builtin: false in params.yaml, then `slq stage validate`")
