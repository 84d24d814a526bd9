"""An independent reference forward of the SLQ recipe, for one item (batch of one, no padding).

Written from the paper (arXiv 2604.13710) and the reference code's recipe (CnFaker/SLQ:
eval/eval_qwen_on_coco.py `emb_data`, train/train_qwen_slq.py `compute_loss`), deliberately
sharing nothing with `slq/`:

1. Prompt: the folder's own MULTIMODAL chat template (chat_template.jinja, else the
   "chat_template" of chat_template.json), rendered with jinja2 the way transformers renders
   chat templates, with `add_generation_prompt=True`. The user turn holds the caption alone, or
   the image with an empty instruction, or the image and an instruction; then the opened
   assistant turn (`<|im_start|>assistant\\n`).
2. The single <|image_pad|> is expanded to grid_t * grid_h * grid_w / merge_size**2 tokens, with
   image_grid_thw from the folder's image processor; tokenized with no special tokens added.
3. Forward: token embeddings; image features from the vision tower (`get_image_features`)
   written at the image-token positions (Qwen3-VL: also its DeepStack features with
   `visual_pos_masks`, query positions never visual); the N_q queries appended after the last
   token; mRoPE positions from the model's own `get_rope_index` over the ids extended with N_q
   pad ids (image inputs), plain 0..L+N_q-1 on every axis for text; the language model's last
   hidden state (after its final norm); mean over the N_q query positions; L2 normalisation.
   Float32 throughout.

Adaptations to the current transformers API (the reference code targets transformers 4.57):
- `get_image_features` returns a model output: the per-image features are in `.pooler_output`
  (a tuple split per image) and Qwen3-VL's DeepStack features in `.deepstack_features` (one
  tuple per DeepStack layer), where the reference unpacked a `(features, deepstack)` tuple.
- `get_rope_index` now needs `mm_token_type_ids` (1 at image tokens, 0 elsewhere, including the
  appended query pads) instead of finding the image tokens itself; it lives on the multimodal
  base model (`model.model`), as in the eval script.
- The decoder's cache argument is `cache`; we pass only `use_cache=False`.
- The reference reads `output_hidden_states=True` then `hidden_states[-1]`; we read
  `last_hidden_state`, which is the same tensor after the final norm.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import torch
import torch.nn.functional as F

IMAGE_PAD = "<|image_pad|>"


def multimodal_template(folder) -> str:
    """The processor's chat template: chat_template.jinja (newer saves) or chat_template.json."""
    p = Path(folder)
    if (p / "chat_template.jinja").is_file():
        return (p / "chat_template.jinja").read_text()
    if (p / "chat_template.json").is_file():
        return json.loads((p / "chat_template.json").read_text())["chat_template"]
    raise FileNotFoundError(f"{p} has neither chat_template.jinja nor chat_template.json")


def render_chat(template: str, messages: list[dict], add_generation_prompt: bool = True) -> str:
    """Render like transformers: sandboxed jinja2, trim_blocks + lstrip_blocks, loopcontrols."""
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise ValueError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    return env.from_string(template).render(messages=messages, add_generation_prompt=add_generation_prompt)


def user_content(text: str | None, with_image: bool) -> list[dict]:
    """The reference recipe's user turn: caption alone; image + (possibly empty) instruction."""
    if not with_image:
        return [{"type": "text", "text": text}]
    return [{"type": "image"}, {"type": "text", "text": text or ""}]


@functools.lru_cache(maxsize=8)
def _load(folder: str, stamp: float):
    import transformers as tf

    model = tf.AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32)
    model.eval()
    tokenizer = tf.AutoTokenizer.from_pretrained(folder)
    image_processor = tf.AutoImageProcessor.from_pretrained(folder)
    return model, tokenizer, image_processor


def load(folder):
    folder = str(Path(folder).resolve())
    return _load(folder, (Path(folder) / "model.safetensors").stat().st_mtime)


def build_prompt_ids(folder, *, text=None, image=None):
    """(input_ids (1, L), pixel_values or None, image_grid_thw or None, prompt string)."""
    model, tokenizer, image_processor = load(folder)
    prompt = render_chat(multimodal_template(folder),
                         [{"role": "user", "content": user_content(text, image is not None)}],
                         add_generation_prompt=True)
    pixel_values = grid = None
    if image is not None:
        assert prompt.count(IMAGE_PAD) == 1, prompt
        feats = image_processor(images=[image.convert("RGB")], return_tensors="pt")
        pixel_values, grid = feats["pixel_values"].float(), feats["image_grid_thw"]
        merge = model.config.vision_config.spatial_merge_size
        n_tokens = int(grid[0].prod()) // merge**2
        prompt = prompt.replace(IMAGE_PAD, IMAGE_PAD * n_tokens)
    ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
    return ids, pixel_values, grid, prompt


@torch.no_grad()
def reference_embed(folder, queries: torch.Tensor, *, text: str | None = None, image=None) -> torch.Tensor:
    """One item's SLQ embedding, (D,) fp32 L2-normalised.  queries: (Nq, D)."""
    if text is None and image is None:
        raise ValueError("give text, image, or both")
    model, tokenizer, _ = load(folder)
    base = model.model  # vision tower + language model, no lm_head
    cfg = model.config
    queries = queries.detach().float()
    n_q = queries.shape[0]
    ids, pixel_values, grid, _ = build_prompt_ids(folder, text=text, image=image)
    L = ids.shape[1]

    embeds = base.get_input_embeddings()(ids).clone()  # (1, L, D)
    lm_kwargs = {}
    if pixel_values is not None:
        vis = base.get_image_features(pixel_values=pixel_values, image_grid_thw=grid)
        feats = torch.cat(list(vis.pooler_output), dim=0).float()  # (n_tokens, D)
        image_mask = ids == cfg.image_token_id  # (1, L)
        assert int(image_mask.sum()) == feats.shape[0]
        embeds[image_mask] = feats
        if cfg.model_type == "qwen3_vl":
            deepstack = [torch.cat(list(f), dim=0).float() for f in vis.deepstack_features]
            lm_kwargs["visual_pos_masks"] = torch.cat([image_mask, image_mask.new_zeros(1, n_q)], dim=1)
            lm_kwargs["deepstack_visual_embeds"] = deepstack

    x = torch.cat([embeds, queries.unsqueeze(0)], dim=1)  # (1, L+Nq, D)
    attention_mask = torch.ones(1, L + n_q, dtype=torch.long)
    if pixel_values is not None:
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 151643
        ids_ext = torch.cat([ids, ids.new_full((1, n_q), pad_id)], dim=1)
        mm_token_type_ids = (ids_ext == cfg.image_token_id).int()
        position_ids, _ = base.get_rope_index(ids_ext, mm_token_type_ids=mm_token_type_ids,
                                              image_grid_thw=grid, video_grid_thw=None, attention_mask=None)
    else:
        position_ids = torch.arange(L + n_q).view(1, 1, -1).expand(3, 1, -1)
    out = base.language_model(input_ids=None, inputs_embeds=x, attention_mask=attention_mask,
                              position_ids=position_ids, use_cache=False, **lm_kwargs)
    h = out.last_hidden_state[0, -n_q:].float().mean(dim=0)  # (D,)
    return F.normalize(h, dim=-1)
