"""SLQ in MTEB / MIEB (mteb 2.x): an encoder wrapper and image-text retrieval tasks over local data.

`SLQMtebEncoder(encoder)` (or `SLQMtebEncoder.from_checkpoint(folder)`) implements mteb's encoder
protocol (`mteb.models.models_protocols.EncoderProtocol`): `encode(inputs, *, task_metadata, hf_split,
hf_subset, prompt_type=None)` takes a DataLoader whose batches are dicts with "text" and/or "image"
(PIL images) and returns SLQ's L2-normalised float32 embeddings; an image with a text is encoded as
a multimodal (image, instruction) pair. Its `ModelMeta` declares the modalities ["image", "text"]
(mteb refuses image tasks otherwise) and dot-product scoring (exact on normalised embeddings, and
the same score `slq.retrieval` ranks by).

`manifest_t2i_task(root, split)` makes a text-to-image retrieval task (`AbsTaskRetrieval`, type
Any2AnyRetrieval, category t2i) from a manifest folder (the built-in world, or a COCO folder via
`coco_t2i_task`), with no hub access: queries are the captions, the corpus the split's images, each
caption's one relevant document its image. `mteb.evaluate(SLQMtebEncoder(enc), [task])` then scores
it with mteb's own evaluator (recall@k, nDCG@10, ...).

mteb is optional: `pip install "mteb>=2,<3"`; this module imports it at import time.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
from mteb.abstasks.retrieval import AbsTaskRetrieval
from mteb.abstasks.task_metadata import TaskMetadata
from mteb.models.abs_encoder import AbsEncoder
from mteb.models.model_meta import ModelMeta, ScoringFunction

from slq.data import image_path, load_manifest

__all__ = ["SLQMtebEncoder", "model_meta", "local_t2i_task", "manifest_t2i_task", "coco_t2i_task",
           "QUERY_PREFIX", "DOC_PREFIX"]

QUERY_PREFIX, DOC_PREFIX = "q:", "d:"  # query and corpus ids never coincide (mteb may drop equal ids)


def model_meta(name: str = "slq/slq", revision: str | None = None, embed_dim: int | None = None,
               n_parameters: int | None = None) -> ModelMeta:
    """The ModelMeta of an SLQ encoder: image + text, dense, dot product on L2-normalised float32."""
    return ModelMeta.create_empty(dict(
        name=name, revision=revision or "local", modalities=["image", "text"], model_type=["dense"],
        embed_dim=embed_dim, n_parameters=n_parameters, similarity_fn_name=ScoringFunction.DOT_PRODUCT,
        framework=["PyTorch", "Transformers"], use_instructions=False, open_weights=True,
        languages=["eng-Latn"], public_training_code=None, training_datasets=set()))


def _features(inputs) -> set[str]:
    feats = getattr(getattr(inputs, "dataset", None), "features", None)
    return set(feats) if feats is not None else set()


class SLQMtebEncoder(AbsEncoder):
    """An SLQ encoder (any method's `SLQEncoder`) behind mteb 2.x's encoder protocol."""

    def __init__(self, encoder, name: str = "slq/slq", revision: str | None = None, batch_size: int = 32):
        self.encoder = encoder
        self.batch_size = batch_size
        dim = getattr(getattr(encoder, "backbone", None), "hidden_size", None)
        self.mteb_model_meta = model_meta(name, revision, embed_dim=dim)

    @classmethod
    def from_checkpoint(cls, checkpoint: str | Path, backbone: str | Path | None = None,
                        name: str | None = None, **kwargs) -> "SLQMtebEncoder":
        """A trained checkpoint folder (its manifest names the backbone and the method)."""
        from slq.methods import from_pretrained

        enc = from_pretrained(backbone, queries=checkpoint, **kwargs)
        return cls(enc, name=name or f"slq/{Path(checkpoint).name}")

    def encode(self, inputs, *, task_metadata: TaskMetadata, hf_split: str, hf_subset: str,
               prompt_type=None, **kwargs: Any) -> np.ndarray:
        """One (N, D) float32 array for the DataLoader's rows, in order."""
        feats = _features(inputs)
        out = []
        for batch in inputs:
            texts = batch.get("text") if "text" in batch else None
            images = batch.get("image") if "image" in batch else None
            has_text = texts is not None and ("text" in feats or any(t for t in texts))
            if images is not None and has_text:
                out.append(self.encoder.encode_multimodal(list(zip(images, texts)), batch_size=self.batch_size,
                                                          progress=False))
            elif images is not None:
                out.append(self.encoder.encode_image(list(images), batch_size=self.batch_size, progress=False))
            elif texts is not None:
                out.append(self.encoder.encode_text(list(texts), batch_size=self.batch_size, progress=False))
            else:
                raise ValueError(f"mteb batch with neither text nor image (keys {sorted(batch)})")
        if not out:
            return np.zeros((0, self.mteb_model_meta.embed_dim or 0), dtype=np.float32)
        return np.concatenate(out).astype(np.float32, copy=False)


class _LocalT2IRetrieval(AbsTaskRetrieval):
    """A text-to-image retrieval task whose data is given, not loaded from the hub."""

    k_values = (1, 5, 10)
    _split_data: dict

    def load_data(self, num_proc: int | None = None, **kwargs) -> None:
        if self.data_loaded:
            return
        self.dataset = {"default": {split: dict(d) for split, d in self._split_data.items()}}
        self.data_loaded = True


def local_t2i_task(images: Sequence, captions: Sequence[str], caption_to_image: Sequence[int], *,
                   name: str = "SLQLocalT2IRetrieval", split: str = "test",
                   description: str = "Local text-to-image retrieval (SLQ)",
                   image_ids: Sequence[str] | None = None) -> AbsTaskRetrieval:
    """A t2i task: `captions` query the `images` (PIL images); caption j's one relevant image is
    images[caption_to_image[j]]. Scored at k = 1, 5, 10 (main score nDCG@10)."""
    from datasets import Dataset, Features, Image, Value

    if len(captions) != len(caption_to_image):
        raise ValueError(f"{len(captions)} captions but {len(caption_to_image)} image indices")
    doc_ids = [f"{DOC_PREFIX}{i if image_ids is None else image_ids[i]}" for i in range(len(images))]
    if len(set(doc_ids)) != len(doc_ids):
        raise ValueError("image ids must be unique")
    corpus = Dataset.from_dict({"id": doc_ids, "image": list(images)},
                               features=Features({"id": Value("string"), "image": Image()}))
    query_ids = [f"{QUERY_PREFIX}{j}" for j in range(len(captions))]
    queries = Dataset.from_dict({"id": query_ids, "text": list(captions)})
    qrels = {q: {doc_ids[int(i)]: 1} for q, i in zip(query_ids, caption_to_image)}
    meta = TaskMetadata(
        name=name, description=description, reference=None,
        dataset={"path": f"local/{name}", "revision": "local"},
        type="Any2AnyRetrieval", category="t2i", eval_splits=[split], eval_langs=["eng-Latn"],
        main_score="ndcg_at_10", date=None, domains=None, task_subtypes=["Image Text Retrieval"],
        license=None, annotations_creators=None, dialect=None, modalities=["text", "image"],
        sample_creation=None, bibtex_citation=None)
    task_cls = type(name, (_LocalT2IRetrieval,), {"metadata": meta})
    task = task_cls()
    task._split_data = {split: {"corpus": corpus, "queries": queries, "relevant_docs": qrels, "top_ranked": None}}
    return task


def manifest_t2i_task(root: str | Path, split: str = "test", manifest: str = "manifest.jsonl",
                      name: str | None = None):
    """A t2i task over a manifest folder's `split` (one JSON object per line: id, image_id, image,
    caption, split). Returns (task, rows, image_ids): the split's caption rows in query order and
    its image ids in corpus order (first appearance)."""
    from PIL import Image

    root = Path(root)
    rows = [r for r in load_manifest(root, manifest) if r.get("split") == split]
    if not rows:
        raise ValueError(f"{root / manifest}: no rows in split {split!r}")
    image_ids, first = [], {}
    for r in rows:
        if r["image_id"] not in first:
            first[r["image_id"]] = r
            image_ids.append(r["image_id"])
    index = {iid: i for i, iid in enumerate(image_ids)}
    images = []
    for iid in image_ids:
        with Image.open(image_path(root, first[iid])) as im:
            images.append(im.convert("RGB"))
    task = local_t2i_task(images, [r["caption"] for r in rows], [index[r["image_id"]] for r in rows],
                          name=name or f"SLQManifestT2I_{root.name}_{split}", split=split,
                          image_ids=[str(i) for i in image_ids])
    return task, rows, image_ids


def coco_t2i_task(karpathy: str | Path, images: str | Path, out: str | Path, split: str = "test", **kwargs):
    """A t2i task over a COCO-format folder (the Karpathy split file + the image folder): writes the
    manifest to `out` with `slq.data.coco.build_coco_manifest`, then `manifest_t2i_task(out, split)`."""
    from slq.data.coco import build_coco_manifest

    build_coco_manifest(karpathy, images, out, progress=False, **kwargs)
    return manifest_t2i_task(out, split, name=f"SLQCocoT2I_{split}")
