"""`slq data`: the built-in synthetic world, and the COCO training manifest."""

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
