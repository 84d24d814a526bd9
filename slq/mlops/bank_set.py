"""The query banks a search service serves: one loaded backbone, the served checkpoint as bank
`default`, and every other bank loaded onto the same backbone (slq.banks.MultiBankEncoder).

    slq serve --search --bank captions=checkpoints/banks/captions --bank-index captions=lancedb_captions
    slq serve --search --bank q16 --bank seed1     # the pipeline's banks: params/banks/<name>.yaml

A bank trained on another backbone (content fingerprint), with another pixel budget, or by a
method that changes the backbone (LoRA, full fine-tuning) is refused by name before the server
starts. Requests name a bank (`bank` on /search, /v1/embeddings and /answer; default `default`) or,
on /v1/embeddings, several: their embeddings come from one pass over each input (one prompt
prefill, every bank's queries in one forward). A bank searches its own LanceDB index (built with
its checkpoint, as the index stage builds the default one); a bank without one embeds but does not
search.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from slq.mlops.config import Config
from slq.mlops.search import Searcher, SearchError

DEFAULT_BANK = "default"
BANK_OVERLAYS = "params/banks"  # the pipeline's bank set: one params overlay per bank (dvc.yaml's bank_* stages)


class UnknownBank(SearchError):
    """A request names a bank the service did not load."""


class BankView:
    """One bank of a MultiBankEncoder with the single-bank encoder's `encode_*` interface."""

    def __init__(self, multibank, name: str):
        self.multibank, self.name = multibank, name
        self.backbone = multibank.backbone

    def encode_text(self, texts, progress=False, **kw) -> np.ndarray:
        return self.multibank.encode_text(texts, banks=[self.name], progress=progress, **kw)[self.name]

    def encode_image(self, images, progress=False, **kw) -> np.ndarray:
        return self.multibank.encode_image(images, banks=[self.name], progress=progress, **kw)[self.name]

    def encode_multimodal(self, pairs, progress=False, **kw) -> np.ndarray:
        return self.multibank.encode_multimodal(pairs, banks=[self.name], progress=progress, **kw)[self.name]


@dataclasses.dataclass
class Bank:
    name: str
    encoder: object  # encode_text / encode_image / encode_multimodal -> (N, D) float32
    checkpoint_hash: str
    searcher: Searcher | None  # None: no index for this bank (it embeds, it does not search)
    source: str


def parse_pairs(items: Sequence[str] | None, option: str) -> dict[str, str]:
    """`NAME=VALUE` items (a CLI option given several times) -> {name: value}; ValueError of one line."""
    out: dict[str, str] = {}
    for item in items or []:
        name, sep, value = item.partition("=")
        name, value = name.strip(), value.strip()
        if not sep or not name or not value:
            raise ValueError(f"{option} {item!r}: expected NAME=PATH")
        if name in out:
            raise ValueError(f"{option} {name!r} is given twice")
        out[name] = value
    return out


def pipeline_bank(cfg: Config, name: str) -> tuple[Path, Path | None]:
    """A bank of the pipeline's bank set by name -> (its checkpoint, its LanceDB index or None when
    the index stage has not built it), read from its overlay `params/banks/<name>.yaml` (what
    dvc.yaml's bank_* stages run). Relative paths are taken from the served project's folder."""
    from slq.mlops.config import ConfigError, load_config

    overlay = cfg.path(Path(BANK_OVERLAYS) / f"{name}.yaml")
    if not overlay.is_file():
        raise ValueError(f"--bank {name!r}: no pipeline bank {overlay} (dvc.yaml's bank set); give NAME=CHECKPOINT "
                         "for a checkpoint of your own")
    try:
        bank_cfg = load_config(overlay)
    except ConfigError as e:
        raise ValueError(f"--bank {name!r}: {e}") from None
    index = cfg.path(bank_cfg.index.uri)
    return cfg.path(bank_cfg.train.out), (index if index.is_dir() else None)


def resolve_banks(cfg: Config, items: Sequence[str] | None,
                  index_items: Sequence[str] | None = None) -> tuple[dict[str, str], dict[str, str]]:
    """The serve command's --bank and --bank-index items -> ({name: checkpoint}, {name: index}).

    `NAME=CHECKPOINT` is taken as given; a bare `NAME` is the pipeline's bank of that name
    (`pipeline_bank`), served with the index its bank_index stage built, unless --bank-index names
    another. ValueError of one line for anything else."""
    named = [i for i in items or [] if "=" not in i]
    banks = parse_pairs([i for i in items or [] if "=" in i], "--bank")
    indexes = parse_pairs(index_items, "--bank-index")
    for name in named:
        name = name.strip()
        if not name:
            raise ValueError("--bank '': expected NAME or NAME=CHECKPOINT")
        if name in banks:
            raise ValueError(f"--bank {name!r} is given twice")
        ckpt, index = pipeline_bank(cfg, name)
        banks[name] = str(ckpt)
        if index is not None:
            indexes.setdefault(name, str(index))
    return banks, indexes


class BankSet:
    """The service's banks, in load order, the served checkpoint's first (`DEFAULT_BANK`)."""

    def __init__(self, cfg: Config, encoder, checkpoint_hash: str, searcher: Searcher,
                 banks: Mapping[str, str | Path] | None = None, indexes: Mapping[str, str | Path] | None = None,
                 *, exact: bool = False, source: str = ""):
        self.multibank = None
        self.banks: dict[str, Bank] = {DEFAULT_BANK: Bank(DEFAULT_BANK, encoder, checkpoint_hash, searcher,
                                                          source or "the served checkpoint")}
        banks, indexes = dict(banks or {}), dict(indexes or {})
        if DEFAULT_BANK in banks:
            raise SearchError(f"--bank {DEFAULT_BANK!r}: that name is the served checkpoint's (train.out); give the "
                              "bank another name")
        stray = sorted(set(indexes) - set(banks) - {DEFAULT_BANK})
        if stray:
            raise SearchError(f"--bank-index for {', '.join(map(repr, stray))}: no such bank; give --bank NAME=CKPT too")
        if DEFAULT_BANK in indexes:
            raise SearchError(f"--bank-index {DEFAULT_BANK!r}: the served checkpoint searches index.uri; set that instead")
        if not banks:
            return
        from slq.banks import BankError, MultiBankEncoder
        from slq.checkpoint import checkpoint_hash as hash_of

        try:
            self.multibank = MultiBankEncoder.from_encoders({DEFAULT_BANK: encoder})
        except BankError as e:
            raise SearchError(f"the served checkpoint cannot carry other banks: {e}") from None
        for name, ckpt in banks.items():
            ckpt = cfg.path(ckpt)
            try:
                self.multibank.add_checkpoint(name, ckpt, allow_backbone_mismatch=cfg.backbone.allow_mismatch)
            except BankError as e:
                raise SearchError(str(e)) from None
            h = hash_of(ckpt)
            searcher = None
            if name in indexes:
                uri = cfg.path(indexes[name])
                if not uri.is_dir():
                    raise SearchError(f"bank {name!r}: no LanceDB index at {uri} (--bank-index); build one with its "
                                      "checkpoint (slq stage embed and index with --set train.out=... --set "
                                      "embed.out=... --set index.uri=...)")
                bank_cfg = dataclasses.replace(cfg, index=dataclasses.replace(
                    cfg.index, uri=str(uri), out=str(uri / "index.json")))
                searcher = Searcher(bank_cfg, h, exact=exact, source=f"bank {name!r} ({ckpt})")
                searcher.check_tables(cfg.evaluate.split)  # another checkpoint's table stops the start
            self.banks[name] = Bank(name, BankView(self.multibank, name), h, searcher, f"bank {name!r} ({ckpt})")

    @property
    def names(self) -> list[str]:
        return list(self.banks)

    def get(self, name: str | None) -> Bank:
        name = DEFAULT_BANK if name is None else name
        if name not in self.banks:
            raise UnknownBank(f"unknown bank {name!r}; this service serves {', '.join(map(repr, self.names))}")
        return self.banks[name]

    def encode(self, kind: str, items: list, names: Sequence[str]) -> dict[str, np.ndarray]:
        """{bank: (N, D)} for `names` (each loaded), every bank from one pass over the inputs where
        there are several."""
        for n in names:
            self.get(n)
        if len(names) == 1 or self.multibank is None:
            enc = self.banks[names[0]].encoder
            return {names[0]: getattr(enc, f"encode_{kind}")(items, progress=False)}
        return getattr(self.multibank, f"encode_{kind}")(items, banks=list(names), progress=False)
