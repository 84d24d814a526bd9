"""Tiny, randomly initialised models of the real MLLM classes, for tests and the offline default.

`build_tiny_backbone(model_type, out_dir)` writes a directory that looks exactly like a
downloaded Hugging Face checkpoint (config, weights, processor, tokenizer, chat template), so
it is loaded back through the same `from_pretrained` path as a real one.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from slq.miniature.tokenizer import (
    LLAVA_SPECIALS,
    QWEN_SPECIALS,
    build_bpe_tokenizer,
    wrap_fast,
)

# Chat templates written for the tiny models; real checkpoints bring their own.
QWEN_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "<|im_start|>{{ message['role'] + '\\n' }}"
    "{%- if message['content'] is string -%}{{ message['content'] }}"
    "{%- else -%}{%- for c in message['content'] -%}"
    "{%- if c['type'] == 'image' -%}<|vision_start|><|image_pad|><|vision_end|>"
    "{%- elif c['type'] == 'text' -%}{{ c['text'] }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}<|im_end|>{{ '\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|im_start|>assistant{{ '\\n' }}{%- endif -%}"
)
LLAVA_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{ message['role'] | upper }}: "
    "{%- if message['content'] is string -%}{{ message['content'] }}"
    "{%- else -%}{%- for c in message['content'] -%}"
    "{%- if c['type'] == 'image' -%}<image>{{ '\\n' }}"
    "{%- elif c['type'] == 'text' -%}{{ c['text'] }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}</s>"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}ASSISTANT:{%- endif -%}"
)

TINY_TYPES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "llava")

# Pixel budget of the tiny Qwen processors: 28 px units (patch 14 x merge 2).
_TINY_MIN_PIXELS = 56 * 56
_TINY_MAX_PIXELS = 112 * 112


# Random weights at the usual 0.02 std make a 64-wide decoder nearly input-independent (every
# caption's query state ends up with cosine ~0.998 to every other); 0.1 keeps inputs apart.
INIT_STD = 0.1


def _text_cfg(vocab: int, hidden: int, layers: int, heads: int, kv_heads: int, init_std: float = INIT_STD,
              **extra) -> dict:
    return dict(
        initializer_range=init_std,
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=4096,
        rms_norm_eps=1e-6,
        **extra,
    )


def _qwen_tokenizer(corpus: Iterable[str], vocab_size: int):
    tok = build_bpe_tokenizer(QWEN_SPECIALS, corpus, vocab_size)
    fast = wrap_fast(tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    fast.chat_template = QWEN_CHAT_TEMPLATE
    return fast


def _qwen(model_type: str, corpus, vocab_size: int, hidden: int, layers: int, *, vision_dim: int = 32,
          vision_depth: int = 2, image_pixels: int | None = None, init_std: float = INIT_STD):
    import transformers as tf

    tokenizer = _qwen_tokenizer(corpus, vocab_size)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN_SPECIALS}
    head_dim = hidden // 4
    common = dict(
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=True,
    )
    section = [head_dim // 8, head_dim * 3 // 16, head_dim * 3 // 16]  # sums to head_dim / 2
    section[0] += head_dim // 2 - sum(section)
    rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": section}
    text = _text_cfg(
        len(tokenizer), hidden, layers, 4, 2, init_std, rope_parameters=rope,
        bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
    )
    if model_type == "qwen2_vl":
        vision = dict(depth=vision_depth, embed_dim=vision_dim, hidden_size=hidden, num_heads=2, mlp_ratio=2,
                      patch_size=14, spatial_merge_size=2, temporal_patch_size=2, initializer_range=init_std)
        config = tf.Qwen2VLConfig(text_config=text, vision_config=vision, **common)
        model = tf.Qwen2VLForConditionalGeneration(config)
        side = image_pixels or 0
        image_processor = tf.Qwen2VLImageProcessorPil(
            min_pixels=max(_TINY_MIN_PIXELS, side * side), max_pixels=max(_TINY_MAX_PIXELS, side * side),
            patch_size=14, merge_size=2)
        processor_cls = tf.Qwen2VLProcessor
    elif model_type == "qwen2_5_vl":
        vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=hidden,
                      patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=56,
                      fullatt_block_indexes=[1])
        config = tf.Qwen2_5_VLConfig(text_config=text, vision_config=vision, **common)
        model = tf.Qwen2_5_VLForConditionalGeneration(config)
        image_processor = tf.Qwen2VLImageProcessorPil(
            min_pixels=_TINY_MIN_PIXELS, max_pixels=_TINY_MAX_PIXELS, patch_size=14, merge_size=2)
        processor_cls = tf.Qwen2_5_VLProcessor
    elif model_type == "qwen3_vl":
        text["head_dim"] = head_dim
        rope["mrope_interleaved"] = True
        vision = dict(depth=max(vision_depth, 2) if image_pixels else 3, hidden_size=vision_dim,
                      intermediate_size=vision_dim * 2, num_heads=2, out_hidden_size=hidden,
                      patch_size=16, spatial_merge_size=2, temporal_patch_size=2,
                      num_position_embeddings=64, deepstack_visual_indexes=[0, 1], initializer_range=init_std)
        config = tf.Qwen3VLConfig(text_config=text, vision_config=vision, **common)
        model = tf.Qwen3VLForConditionalGeneration(config)
        image_processor = _qwen3_image_processor(image_pixels)
        processor_cls = tf.Qwen3VLProcessor
    else:  # pragma: no cover - guarded by the caller
        raise ValueError(model_type)
    processor = _processor(processor_cls)(image_processor=image_processor, tokenizer=tokenizer,
                                          chat_template=QWEN_CHAT_TEMPLATE)
    return model, processor


def _qwen3_image_processor(image_pixels: int | None = None):
    import transformers as tf

    # Qwen3-VL: patch 16 x merge 2 = 32 px units.
    side = image_pixels or 0
    return tf.Qwen2VLImageProcessorPil(
               min_pixels=max(64 * 64, side * side), max_pixels=max(128 * 128, side * side), patch_size=16, merge_size=2,
               image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])


def _processor(cls):
    """The family's processor without its video processor: the tiny models never see video, and
    saving none keeps the folder loadable with or without torchvision (see load_processor)."""
    from slq.backbones.base import _image_only_processor

    return _image_only_processor(cls)


def _llava(corpus, vocab_size: int, hidden: int, layers: int):
    import transformers as tf

    tok = build_bpe_tokenizer(LLAVA_SPECIALS, corpus, vocab_size)
    tokenizer = wrap_fast(tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    tokenizer.chat_template = LLAVA_CHAT_TEMPLATE
    image_token_id = tokenizer.convert_tokens_to_ids("<image>")
    text = _text_cfg(len(tokenizer), hidden, layers, 4, 2, model_type="llama", head_dim=hidden // 4,
                     pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                     eos_token_id=tokenizer.eos_token_id)
    vision = dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=2, image_size=56, patch_size=14, projection_dim=32)
    config = tf.LlavaConfig(text_config=text, vision_config=vision, image_token_id=image_token_id,
                            vision_feature_layer=-1, vision_feature_select_strategy="full",
                            tie_word_embeddings=True)
    model = tf.LlavaForConditionalGeneration(config)
    image_processor = tf.CLIPImageProcessorPil(size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56})
    processor = tf.LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=14,
                                  vision_feature_select_strategy="full", chat_template=LLAVA_CHAT_TEMPLATE,
                                  num_additional_image_tokens=1)
    return model, processor


def build_tiny_backbone(
    model_type: str,
    out_dir: str | Path,
    *,
    seed: int = 0,
    hidden_size: int = 64,
    num_layers: int = 2,
    vocab_size: int = 1024,
    corpus: Iterable[str] = (),
    vision_dim: int = 32,
    vision_depth: int = 2,
    image_pixels: int | None = None,
    init_std: float = INIT_STD,
) -> Path:
    """Build, save and return the directory of a tiny random model of `model_type`.

    The directory is written to a temporary sibling and renamed, so a half-written
    backbone is never left behind.
    """
    import torch

    from slq.io import write_atomic_dir

    if model_type not in TINY_TYPES:
        raise ValueError(f"no tiny builder for model_type {model_type!r}; available: {', '.join(TINY_TYPES)}")
    out_dir = Path(out_dir)
    torch.manual_seed(seed)
    if model_type == "llava":
        model, processor = _llava(corpus, vocab_size, hidden_size, num_layers)
    else:
        model, processor = _qwen(model_type, corpus, vocab_size, hidden_size, num_layers, vision_dim=vision_dim,
                                 vision_depth=vision_depth, image_pixels=image_pixels, init_std=init_std)

    def write(tmp: Path):
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)

    write_atomic_dir(out_dir, write)
    return out_dir
