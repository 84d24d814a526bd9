"""`slq export`: a checkpoint as a portable model folder (slq, sentence-transformers, the Hub)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from slq.mlops.cli.common import JsonOpt, console, print_json, user_errors


@user_errors
def export(checkpoint: Path = typer.Argument(..., help="The checkpoint folder (queries.safetensors + slq.json)."),
           out: Path = typer.Argument(..., help="The model folder to write (written whole, then renamed)."),
           with_backbone: bool = typer.Option(False, "--with-backbone",
                                              help="Copy the backbone into OUT/backbone: a self-contained folder."),
           metrics: Optional[Path] = typer.Option(None, "--metrics", help="The evaluate stage's metrics JSON "
                                                  "(metrics/eval.json) for the model card; it must be this "
                                                  "checkpoint's."),
           split: str = typer.Option("test", help="The split the metrics' top-level numbers were computed on "
                                     "(evaluate.split)."),
           force: bool = typer.Option(False, "--force", help="Replace OUT if it exists."),
           backbone: Optional[Path] = typer.Option(None, "--backbone", help="The backbone folder on this machine, "
                                                   "when not at the path slq.json records (same fingerprint)."),
           base_model: Optional[str] = typer.Option(None, "--base-model", help="The backbone's Hub id for the card "
                                                    "(default: from its cache path or config.json)."),
           license_: Optional[str] = typer.Option(None, "--license", help="The card's license (default: the "
                                                  "backbone's README.md header's; else `other`)."),
           query_prompt: str = typer.Option("", help="sentence-transformers' query prompt (encode_query)."),
           document_prompt: str = typer.Option("", help="sentence-transformers' document prompt (encode_document)."),
           as_json: bool = JsonOpt):
    """Write a checkpoint as a model folder: its files, a model card (README.md) and the
    sentence-transformers files, ready for `huggingface_hub.upload_folder` (no network use).

    slq export checkpoints/slq exported/slq-world --metrics metrics/eval.json --with-backbone
    """
    from slq.export import export_model

    done = export_model(checkpoint, out, with_backbone=with_backbone, metrics=metrics, split=split, force=force,
                        backbone=backbone, base_model=base_model, license=license_, query_prompt=query_prompt,
                        document_prompt=document_prompt)
    if as_json:
        print_json(done.to_dict())
        return
    c = console()
    c.print(f"exported {checkpoint} ({done.method}) to {done.path}: {len(done.files)} files, "
            f"{done.size_bytes / 1e6:.1f} MB", soft_wrap=True)
    c.print(f"backbone: {done.backbone}{' (copied)' if done.with_backbone else ''}", soft_wrap=True)
    for w in done.warnings:
        console(stderr=True).print(f"[bold yellow]warning:[/] {w}", soft_wrap=True, markup=True)
    c.print(f"load: slq.methods.from_pretrained(BACKBONE, {str(done.path)!r}) or "
            f"SentenceTransformer({str(done.path)!r}, trust_remote_code=True)", soft_wrap=True, markup=False)
