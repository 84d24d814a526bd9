"""Checkpoint folders that look exactly like the real Hugging Face downloads, scaled down.

`build_real_layout(family, out_dir)` writes the FILE SET of one real download, with the real
file structure and values, shrinking only what size forces (hidden sizes, layers, heads, the
ordinary BPE vocabulary):

| family       | looks like                          |
|--------------|-------------------------------------|
| `qwen2_vl`   | Qwen/Qwen2-VL-2B-Instruct           |
| `qwen2_5_vl` | Qwen/Qwen2.5-VL-3B-Instruct         |
| `qwen3_vl`   | Qwen/Qwen3-VL-4B-Instruct           |
| `llava`      | llava-hf/llava-1.5-7b-hf            |

What is kept real: config.json keys and nesting (Qwen2/2.5-VL: the flat legacy layout with
`rope_scaling: {"type": "mrope"}` and `torch_dtype`; Qwen3-VL: `text_config` / `vision_config`
with `dtype`; llava-1.5-hf: a partial `text_config` over Llama defaults), special token ids,
vocab sizes (151936 / 32064), patch and merge sizes, `tie_word_embeddings`; the tokenizer's
special/added tokens at their real ids, tokenizer_config.json (class, `added_tokens_decoder`,
`model_max_length`, pad/eos) and its chat template; the multimodal chat template in
chat_template.json (or chat_template.jinja with `template="jinja"`, the newer save format);
preprocessor_config.json / video_preprocessor_config.json / processor_config.json with the real
pixel settings; generation_config.json; the legacy safetensors key names of the older
checkpoints (Qwen2-VL, Qwen2.5-VL and llava-1.5-hf predate transformers' `model.language_model`
layout; Qwen3-VL was released with it).

The trap this reproduces: Qwen2.5-VL's tokenizer_config.json carries the TEXT-ONLY Qwen2.5 chat
template (string concatenation of `message.content`: a TypeError on list content); the
multimodal template is only in chat_template.json. Qwen3-VL's tokenizer_config.json likewise
carries a text template (list content renders as empty), its VL template is in chat_template.json.

Sources: config / generation / chat_template.json of Qwen3-VL-4B-Instruct as mirrored in
sophgo/LLM-TPU models/Qwen3_VL/config; Qwen2.5-VL config as mirrored in sophgo/LLM-TPU
models/Qwen2_5_VL/config/config.json; the Qwen2-VL / Qwen2.5-VL multimodal template and the
llava-1.5-hf template as quoted verbatim by several public repositories; the rest from the
model cards' files as commonly reproduced (see the report that came with this file).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "llava")

# ---------------------------------------------------------------------------------------------
# Chat templates, as the real downloads ship them.
# ---------------------------------------------------------------------------------------------

# Qwen2-VL-*-Instruct and Qwen2.5-VL-*-Instruct chat_template.json (identical in both).
QWEN2_VL_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}"
    "Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}"
    "Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Qwen2.5-VL-*-Instruct tokenizer_config.json: the text-only Qwen2.5 template (default system
# prompt "You are a helpful assistant."); `message.content` is concatenated as a string.
QWEN2_5_TEXT_TEMPLATE = (
    "{%- if tools %}\n"
    "    {{- '<|im_start|>system\\n' }}\n"
    "    {%- if messages[0]['role'] == 'system' %}\n"
    "        {{- messages[0]['content'] }}\n"
    "    {%- else %}\n"
    "        {{- 'You are a helpful assistant.' }}\n"
    "    {%- endif %}\n"
    "    {{- \"\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n"
    "You are provided with function signatures within <tools></tools> XML tags:\\n<tools>\" }}\n"
    "    {%- for tool in tools %}\n"
    "        {{- \"\\n\" }}\n"
    "        {{- tool | tojson }}\n"
    "    {%- endfor %}\n"
    "    {{- \"\\n</tools>\\n\\nFor each function call, return a json object with function name and "
    "arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\\"name\\\": <function-name>, "
    "\\\"arguments\\\": <args-json-object>}\\n</tool_call><|im_end|>\\n\" }}\n"
    "{%- else %}\n"
    "    {%- if messages[0]['role'] == 'system' %}\n"
    "        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}\n"
    "    {%- else %}\n"
    "        {{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}\n"
    "    {%- endif %}\n"
    "{%- endif %}\n"
    "{%- for message in messages %}\n"
    "    {%- if (message.role == \"user\") or (message.role == \"system\" and not loop.first) or "
    "(message.role == \"assistant\" and not message.tool_calls) %}\n"
    "        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}\n"
    "    {%- elif message.role == \"assistant\" %}\n"
    "        {{- '<|im_start|>' + message.role }}\n"
    "        {%- if message.content %}\n"
    "            {{- '\\n' + message.content }}\n"
    "        {%- endif %}\n"
    "        {%- for tool_call in message.tool_calls %}\n"
    "            {%- if tool_call.function is defined %}\n"
    "                {%- set tool_call = tool_call.function %}\n"
    "            {%- endif %}\n"
    "            {{- '\\n<tool_call>\\n{\"name\": \"' }}\n"
    "            {{- tool_call.name }}\n"
    "            {{- '\", \"arguments\": ' }}\n"
    "            {{- tool_call.arguments | tojson }}\n"
    "            {{- '}\\n</tool_call>' }}\n"
    "        {%- endfor %}\n"
    "        {{- '<|im_end|>\\n' }}\n"
    "    {%- elif message.role == \"tool\" %}\n"
    "        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != \"tool\") %}\n"
    "            {{- '<|im_start|>user' }}\n"
    "        {%- endif %}\n"
    "        {{- '\\n<tool_response>\\n' }}\n"
    "        {{- message.content }}\n"
    "        {{- '\\n</tool_response>' }}\n"
    "        {%- if loop.last or (messages[loop.index0 + 1].role != \"tool\") %}\n"
    "            {{- '<|im_end|>\\n' }}\n"
    "        {%- endif %}\n"
    "    {%- endif %}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "    {{- '<|im_start|>assistant\\n' }}\n"
    "{%- endif %}\n"
)

# Qwen3-VL-*-Instruct chat_template.json (no default system prompt; a tools branch).
_QWEN3_VL_CONTENT = (
    "        {%- if message.content is string %}\n"
    "            {{- message.content }}\n"
    "        {%- else %}\n"
    "            {%- for content in message.content %}\n"
    "                {%- if content.type == 'image' or 'image' in content or 'image_url' in content %}\n"
    "                    {%- set image_count.value = image_count.value + 1 %}\n"
    "                    {%- if add_vision_id %}Picture {{ image_count.value }}: {% endif -%}\n"
    "                    <|vision_start|><|image_pad|><|vision_end|>\n"
    "                {%- elif content.type == 'video' or 'video' in content %}\n"
    "                    {%- set video_count.value = video_count.value + 1 %}\n"
    "                    {%- if add_vision_id %}Video {{ video_count.value }}: {% endif -%}\n"
    "                    <|vision_start|><|video_pad|><|vision_end|>\n"
    "                {%- elif 'text' in content %}\n"
    "                    {{- content.text }}\n"
    "                {%- endif %}\n"
    "            {%- endfor %}\n"
    "        {%- endif %}\n"
)
_QWEN3_SYSTEM_CONTENT = (
    "        {%- if messages[0].content is string %}\n"
    "            {{- messages[0].content }}\n"
    "        {%- else %}\n"
    "            {%- for content in messages[0].content %}\n"
    "                {%- if 'text' in content %}\n"
    "                    {{- content.text }}\n"
    "                {%- endif %}\n"
    "            {%- endfor %}\n"
    "        {%- endif %}\n"
)
_QWEN3_TOOLS_HEADER = (
    "    {{- \"# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n"
    "You are provided with function signatures within <tools></tools> XML tags:\\n<tools>\" }}\n"
    "    {%- for tool in tools %}\n"
    "        {{- \"\\n\" }}\n"
    "        {{- tool | tojson }}\n"
    "    {%- endfor %}\n"
    "    {{- \"\\n</tools>\\n\\nFor each function call, return a json object with function name and "
    "arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\\"name\\\": <function-name>, "
    "\\\"arguments\\\": <args-json-object>}\\n</tool_call><|im_end|>\\n\" }}\n"
)
QWEN3_VL_TEMPLATE = (
    "{%- if tools %}\n"
    "    {{- '<|im_start|>system\\n' }}\n"
    "    {%- if messages[0].role == 'system' %}\n"
    + _QWEN3_SYSTEM_CONTENT
    + "        {{- '\\n\\n' }}\n"
    "    {%- endif %}\n"
    + _QWEN3_TOOLS_HEADER
    + "{%- else %}\n"
    "    {%- if messages[0].role == 'system' %}\n"
    "        {{- '<|im_start|>system\\n' }}\n"
    + _QWEN3_SYSTEM_CONTENT
    + "        {{- '<|im_end|>\\n' }}\n"
    "    {%- endif %}\n"
    "{%- endif %}\n"
    "{%- set image_count = namespace(value=0) %}\n"
    "{%- set video_count = namespace(value=0) %}\n"
    "{%- for message in messages %}\n"
    "    {%- if message.role == \"user\" %}\n"
    "        {{- '<|im_start|>' + message.role + '\\n' }}\n"
    + _QWEN3_VL_CONTENT
    + "        {{- '<|im_end|>\\n' }}\n"
    "    {%- elif message.role == \"assistant\" %}\n"
    "        {{- '<|im_start|>' + message.role + '\\n' }}\n"
    "        {%- if message.content is string %}\n"
    "            {{- message.content }}\n"
    "        {%- else %}\n"
    "            {%- for content_item in message.content %}\n"
    "                {%- if 'text' in content_item %}\n"
    "                    {{- content_item.text }}\n"
    "                {%- endif %}\n"
    "            {%- endfor %}\n"
    "        {%- endif %}\n"
    "        {%- if message.tool_calls %}\n"
    "            {%- for tool_call in message.tool_calls %}\n"
    "                {%- if (loop.first and message.content) or (not loop.first) %}\n"
    "                    {{- '\\n' }}\n"
    "                {%- endif %}\n"
    "                {%- if tool_call.function %}\n"
    "                    {%- set tool_call = tool_call.function %}\n"
    "                {%- endif %}\n"
    "                {{- '<tool_call>\\n{\"name\": \"' }}\n"
    "                {{- tool_call.name }}\n"
    "                {{- '\", \"arguments\": ' }}\n"
    "                {%- if tool_call.arguments is string %}\n"
    "                    {{- tool_call.arguments }}\n"
    "                {%- else %}\n"
    "                    {{- tool_call.arguments | tojson }}\n"
    "                {%- endif %}\n"
    "                {{- '}\\n</tool_call>' }}\n"
    "            {%- endfor %}\n"
    "        {%- endif %}\n"
    "        {{- '<|im_end|>\\n' }}\n"
    "    {%- elif message.role == \"tool\" %}\n"
    "        {%- if loop.first or (messages[loop.index0 - 1].role != \"tool\") %}\n"
    "            {{- '<|im_start|>user' }}\n"
    "        {%- endif %}\n"
    "        {{- '\\n<tool_response>\\n' }}\n"
    + _QWEN3_VL_CONTENT
    + "        {{- '\\n</tool_response>' }}\n"
    "        {%- if loop.last or (messages[loop.index0 + 1].role != \"tool\") %}\n"
    "            {{- '<|im_end|>\\n' }}\n"
    "        {%- endif %}\n"
    "    {%- endif %}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "    {{- '<|im_start|>assistant\\n' }}\n"
    "{%- endif %}\n"
)

# Qwen3-VL tokenizer_config.json: a text template of the Qwen3 (2507 Instruct) kind. Non-string
# content renders as '' (so an image or a caption in list form silently disappears).
QWEN3_TEXT_TEMPLATE = (
    "{%- if tools %}\n"
    "    {{- '<|im_start|>system\\n' }}\n"
    "    {%- if messages[0].role == 'system' %}\n"
    "        {{- messages[0].content + '\\n\\n' }}\n"
    "    {%- endif %}\n"
    + _QWEN3_TOOLS_HEADER
    + "{%- else %}\n"
    "    {%- if messages[0].role == 'system' %}\n"
    "        {{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}\n"
    "    {%- endif %}\n"
    "{%- endif %}\n"
    "{%- for message in messages %}\n"
    "    {%- if message.content is string %}\n"
    "        {%- set content = message.content %}\n"
    "    {%- else %}\n"
    "        {%- set content = '' %}\n"
    "    {%- endif %}\n"
    "    {%- if (message.role == \"user\") or (message.role == \"system\" and not loop.first) %}\n"
    "        {{- '<|im_start|>' + message.role + '\\n' + content + '<|im_end|>' + '\\n' }}\n"
    "    {%- elif message.role == \"assistant\" %}\n"
    "        {{- '<|im_start|>' + message.role + '\\n' + content }}\n"
    "        {%- if message.tool_calls %}\n"
    "            {%- for tool_call in message.tool_calls %}\n"
    "                {%- if (loop.first and content) or (not loop.first) %}\n"
    "                    {{- '\\n' }}\n"
    "                {%- endif %}\n"
    "                {%- if tool_call.function %}\n"
    "                    {%- set tool_call = tool_call.function %}\n"
    "                {%- endif %}\n"
    "                {{- '<tool_call>\\n{\"name\": \"' }}\n"
    "                {{- tool_call.name }}\n"
    "                {{- '\", \"arguments\": ' }}\n"
    "                {%- if tool_call.arguments is string %}\n"
    "                    {{- tool_call.arguments }}\n"
    "                {%- else %}\n"
    "                    {{- tool_call.arguments | tojson }}\n"
    "                {%- endif %}\n"
    "                {{- '}\\n</tool_call>' }}\n"
    "            {%- endfor %}\n"
    "        {%- endif %}\n"
    "        {{- '<|im_end|>\\n' }}\n"
    "    {%- elif message.role == \"tool\" %}\n"
    "        {%- if loop.first or (messages[loop.index0 - 1].role != \"tool\") %}\n"
    "            {{- '<|im_start|>user' }}\n"
    "        {%- endif %}\n"
    "        {{- '\\n<tool_response>\\n' }}\n"
    "        {{- content }}\n"
    "        {{- '\\n</tool_response>' }}\n"
    "        {%- if loop.last or (messages[loop.index0 + 1].role != \"tool\") %}\n"
    "            {{- '<|im_end|>\\n' }}\n"
    "        {%- endif %}\n"
    "    {%- endif %}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "    {{- '<|im_start|>assistant\\n' }}\n"
    "{%- endif %}"
)

# llava-hf/llava-1.5-7b-hf chat_template.json.
LLAVA_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}"
    "{% endif %}{# Render all images first #}{% for content in message['content'] | selectattr('type', "
    "'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}{# Render all text next #}{% if message['role'] "
    "!= 'assistant' %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] + ' '}}{% endfor %}{% else %}{% for content in message['content'] | "
    "selectattr('type', 'equalto', 'text') %}{% generation %}{{ content['text'] + ' '}}{% endgeneration %}"
    "{% endfor %}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)

# ---------------------------------------------------------------------------------------------
# Special / added tokens at their real ids.
# ---------------------------------------------------------------------------------------------

# (content, special) from id 151643 on; Qwen2-VL stops at <|video_pad|>, Qwen2.5-VL at
# <|file_sep|>, Qwen3-VL at </think>.
_QWEN_ADDED = [
    ("<|endoftext|>", True), ("<|im_start|>", True), ("<|im_end|>", True),
    ("<|object_ref_start|>", True), ("<|object_ref_end|>", True), ("<|box_start|>", True),
    ("<|box_end|>", True), ("<|quad_start|>", True), ("<|quad_end|>", True),
    ("<|vision_start|>", True), ("<|vision_end|>", True), ("<|vision_pad|>", True),
    ("<|image_pad|>", True), ("<|video_pad|>", True),
    ("<tool_call>", False), ("</tool_call>", False), ("<|fim_prefix|>", False), ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False), ("<|fim_pad|>", False), ("<|repo_name|>", False), ("<|file_sep|>", False),
    ("<tool_response>", False), ("</tool_response>", False), ("<think>", False), ("</think>", False),
]
QWEN_FIRST_ADDED_ID = 151643
_QWEN_N_ADDED = {"qwen2_vl": 14, "qwen2_5_vl": 22, "qwen3_vl": 26}
QWEN_ADDITIONAL_SPECIAL = [
    "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>", "<|box_end|>",
    "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>",
    "<|video_pad|>",
]
QWEN_IDS = {c: QWEN_FIRST_ADDED_ID + i for i, (c, _) in enumerate(_QWEN_ADDED)}

LLAVA_IDS = {"<unk>": 0, "<s>": 1, "</s>": 2, "<image>": 32000, "<pad>": 32001}

# Qwen2's pre-tokenizer split pattern (tokenizer.json of every Qwen2/2.5/3 model).
QWEN_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
              r"\s*[\r\n]+|\s+(?!\S)|\s+")

# A short fixed corpus: only where the small ordinary vocabulary's merges come from.
_CORPUS = """
a an the this that is are of in on at to from with and or not no yes one two three left right top
bottom small large red green blue yellow orange purple white black gray circle square shape image
picture photo describe modify make it modified word sentence caption in one word dog cat sofa sky
user assistant system you are helpful
""".split()

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


def _added_entry(content: str, special: bool) -> dict:
    return {"content": content, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
            "special": special}


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


# ---------------------------------------------------------------------------------------------
# Tokenizers
# ---------------------------------------------------------------------------------------------

def _qwen_tokenizer_files(family: str, out: Path, vocab_size: int) -> None:
    """tokenizer.json, vocab.json, merges.txt, tokenizer_config.json (minus its chat template)."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
    ])
    tok.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    tok.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False, special_tokens=[])
    tok.train_from_iterator([" ".join(_CORPUS)] * 4, trainer=trainer)
    data = json.loads(tok.to_str())
    vocab = dict(data["model"]["vocab"])  # the ordinary vocabulary: ids 0..n-1
    merges = data["model"]["merges"]
    added = _QWEN_ADDED[:_QWEN_N_ADDED[family]]
    # The real vocabulary has 151643 ordinary tokens, then the added ones. Ours is small; the
    # added tokens still sit at their real ids (a sparse id space: the BPE model takes any id).
    data["added_tokens"] = [{"id": QWEN_FIRST_ADDED_ID + i, **_added_entry(c, s)} for i, (c, s) in enumerate(added)]
    for i, (c, _) in enumerate(added):
        data["model"]["vocab"][c] = QWEN_FIRST_ADDED_ID + i
    data["model"].update(dropout=None, unk_token=None, continuing_subword_prefix="", end_of_word_suffix="",
                         fuse_unk=False, byte_fallback=False, ignore_merges=False)
    _write_json(out / "tokenizer.json", data)
    _write_json(out / "vocab.json", vocab)
    merges_txt = ["#version: 0.2"] + [" ".join(m) if isinstance(m, list) else m for m in merges]
    (out / "merges.txt").write_text("\n".join(merges_txt) + "\n")

    cfg = {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": {str(QWEN_FIRST_ADDED_ID + i): _added_entry(c, s) for i, (c, s) in enumerate(added)},
        "additional_special_tokens": list(QWEN_ADDITIONAL_SPECIAL),
        "bos_token": None,
        "chat_template": None,  # filled by the caller
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": {"qwen2_vl": 32768, "qwen2_5_vl": 131072, "qwen3_vl": 262144}[family],
        "pad_token": "<|endoftext|>",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }
    _write_json(out / "tokenizer_config.json", cfg)
    _write_json(out / "special_tokens_map.json", {
        "additional_special_tokens": list(QWEN_ADDITIONAL_SPECIAL), "eos_token": _special_map("<|im_end|>"),
        "pad_token": _special_map("<|endoftext|>")})


def _special_map(content: str) -> dict:
    return {"content": content, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False}


def _llava_tokenizer_files(out: Path, vocab_size: int) -> None:
    """A Llama-style (SentencePiece-BPE, byte fallback) tokenizer.json + tokenizer_config.json."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    byte_tokens = [f"<0x{i:02X}>" for i in range(256)]
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never", split=True)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>", *byte_tokens],
                                  show_progress=False)
    tok.train_from_iterator([" ".join(_CORPUS)] * 4, trainer=trainer)
    data = json.loads(tok.to_str())
    data["pre_tokenizer"] = None  # like the real one: the normalizer adds the "▁"s, no splitting
    data["normalizer"] = {"type": "Sequence", "normalizers": [{"type": "Prepend", "prepend": "▁"},
                                                              {"type": "Replace", "pattern": {"String": " "},
                                                               "content": "▁"}]}
    data["post_processor"] = json.loads(processors.TemplateProcessing(
        single="<s>:0 $A:0", pair="<s>:0 $A:0 <s>:1 $B:1", special_tokens=[("<s>", 1)]).__getstate__())
    data["decoder"] = json.loads(decoders.Sequence([
        decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0),
    ]).__getstate__())
    vocab = data["model"]["vocab"]
    assert vocab["<unk>"] == 0 and vocab["<s>"] == 1 and vocab["</s>"] == 2 and vocab["<0xFF>"] == 258
    vocab["<image>"] = 32000
    vocab["<pad>"] = 32001
    data["added_tokens"] = [
        {"id": 0, **_added_entry("<unk>", True)}, {"id": 1, **_added_entry("<s>", True)},
        {"id": 2, **_added_entry("</s>", True)},
        {"id": 32000, **_added_entry("<image>", True)}, {"id": 32001, **_added_entry("<pad>", True)},
    ]
    data["model"].update(dropout=None, continuing_subword_prefix=None, end_of_word_suffix=None, fuse_unk=True,
                         byte_fallback=True, ignore_merges=False, unk_token="<unk>")
    _write_json(out / "tokenizer.json", data)
    cfg = {
        "add_bos_token": True,
        "add_eos_token": False,
        "added_tokens_decoder": {str(i): _added_entry(c, True) for c, i in LLAVA_IDS.items()},
        "bos_token": "<s>",
        "clean_up_tokenization_spaces": False,
        "eos_token": "</s>",
        "legacy": False,
        "model_max_length": 1000000000000000019884624838656,
        "pad_token": "<pad>",
        "padding_side": "left",
        "processor_class": "LlavaProcessor",
        "sp_model_kwargs": {},
        "tokenizer_class": "LlamaTokenizer",
        "trust_remote_code": False,
        "unk_token": "<unk>",
        "use_default_system_prompt": False,
    }
    _write_json(out / "tokenizer_config.json", cfg)
    _write_json(out / "special_tokens_map.json", {
        "bos_token": _special_map("<s>"), "eos_token": _special_map("</s>"), "image_token": "<image>",
        "pad_token": _special_map("<pad>"), "unk_token": _special_map("<unk>")})


# ---------------------------------------------------------------------------------------------
# Configs (the real files' keys and nesting; sizes shrunk)
# ---------------------------------------------------------------------------------------------

def _qwen2_vl_config(init: float) -> dict:
    # Qwen2-VL-2B-Instruct: flat text params at the top level, rope_scaling {"type": "mrope"}.
    return {
        "architectures": ["Qwen2VLForConditionalGeneration"],
        "attention_dropout": 0.0,
        "bos_token_id": 151643,
        "eos_token_id": 151645,
        "vision_start_token_id": 151652,
        "vision_end_token_id": 151653,
        "vision_token_id": 151654,
        "image_token_id": 151655,
        "video_token_id": 151656,
        "hidden_act": "silu",
        "hidden_size": 64,  # real 1536
        "initializer_range": init,  # real 0.02
        "intermediate_size": 128,  # real 8960
        "max_position_embeddings": 32768,
        "max_window_layers": 28,
        "model_type": "qwen2_vl",
        "num_attention_heads": 4,  # real 12
        "num_hidden_layers": 2,  # real 28
        "num_key_value_heads": 2,
        "rms_norm_eps": 1e-06,
        "rope_theta": 1000000.0,
        "sliding_window": 32768,
        "tie_word_embeddings": True,
        "torch_dtype": "bfloat16",
        "transformers_version": "4.41.2",
        "use_cache": True,
        "use_sliding_window": False,
        "vision_config": {
            "depth": 2,  # real 32
            "embed_dim": 32,  # real 1280
            "mlp_ratio": 4,
            "num_heads": 2,  # real 16
            "in_chans": 3,
            "hidden_size": 64,  # = the text hidden size (real 1536)
            "patch_size": 14,
            "spatial_merge_size": 2,
            "spatial_patch_size": 14,
            "temporal_patch_size": 2,
            "initializer_range": init,
        },
        "rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]},  # real [16, 24, 24] for head_dim 128
        "vocab_size": 151936,
    }


def _qwen2_5_vl_config(init: float) -> dict:
    # Qwen2.5-VL-3B-Instruct.
    return {
        "architectures": ["Qwen2_5_VLForConditionalGeneration"],
        "attention_dropout": 0.0,
        "bos_token_id": 151643,
        "eos_token_id": 151645,
        "vision_start_token_id": 151652,
        "vision_end_token_id": 151653,
        "vision_token_id": 151654,
        "image_token_id": 151655,
        "video_token_id": 151656,
        "hidden_act": "silu",
        "hidden_size": 64,  # real 2048
        "initializer_range": init,
        "intermediate_size": 128,  # real 11008
        "max_position_embeddings": 128000,
        "max_window_layers": 70,
        "model_type": "qwen2_5_vl",
        "num_attention_heads": 4,  # real 16
        "num_hidden_layers": 2,  # real 36
        "num_key_value_heads": 2,
        "rms_norm_eps": 1e-06,
        "rope_theta": 1000000.0,
        "sliding_window": 32768,
        "tie_word_embeddings": True,
        "torch_dtype": "bfloat16",
        "transformers_version": "4.41.2",
        "use_cache": True,
        "use_sliding_window": False,
        "vision_config": {
            "depth": 2,  # real 32
            "hidden_act": "silu",
            "hidden_size": 32,  # real 1280
            "intermediate_size": 64,  # real 3420
            "num_heads": 2,  # real 16
            "in_chans": 3,
            "out_hidden_size": 64,  # = text hidden (real 2048)
            "patch_size": 14,
            "spatial_merge_size": 2,
            "spatial_patch_size": 14,
            "window_size": 112,
            "fullatt_block_indexes": [1],  # real [7, 15, 23, 31]: the last block of every 8
            "tokens_per_second": 2,
            "temporal_patch_size": 2,
            "initializer_range": init,
        },
        "rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]},  # real [16, 24, 24]
        "vocab_size": 151936,
    }


def _qwen3_vl_config(init: float) -> dict:
    # Qwen3-VL-4B-Instruct.
    return {
        "architectures": ["Qwen3VLForConditionalGeneration"],
        "image_token_id": 151655,
        "model_type": "qwen3_vl",
        "text_config": {
            "attention_bias": False,
            "attention_dropout": 0.0,
            "bos_token_id": 151643,
            "dtype": "bfloat16",
            "eos_token_id": 151645,
            "head_dim": 16,  # real 128
            "hidden_act": "silu",
            "hidden_size": 64,  # real 2560
            "initializer_range": init,
            "intermediate_size": 128,  # real 9728
            "max_position_embeddings": 262144,
            "model_type": "qwen3_vl_text",
            "num_attention_heads": 4,  # real 32
            "num_hidden_layers": 2,  # real 36
            "num_key_value_heads": 2,  # real 8
            "rms_norm_eps": 1e-06,
            # real [24, 20, 20] for head_dim 128 (sum 64); ours sums to head_dim / 2 = 8
            "rope_scaling": {"mrope_interleaved": True, "mrope_section": [4, 2, 2], "rope_type": "default"},
            "rope_theta": 5000000,
            "tie_word_embeddings": True,
            "use_cache": True,
            "vocab_size": 151936,
        },
        "tie_word_embeddings": True,
        "transformers_version": "4.57.0.dev0",
        "video_token_id": 151656,
        "vision_config": {
            "deepstack_visual_indexes": [0, 1],  # real [5, 11, 17] of depth 24
            "depth": 2,  # real 24
            "hidden_act": "gelu_pytorch_tanh",
            "hidden_size": 32,  # real 1024
            "in_channels": 3,
            "initializer_range": init,
            "intermediate_size": 64,  # real 4096
            "model_type": "qwen3_vl",
            "num_heads": 2,  # real 16
            "num_position_embeddings": 2304,
            "out_hidden_size": 64,  # = text hidden (real 2560)
            "patch_size": 16,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
        },
        "vision_end_token_id": 151653,
        "vision_start_token_id": 151652,
    }


def _llava_config(init: float) -> dict:
    # llava-hf/llava-1.5-7b-hf: a partial text_config over Llama defaults (so the shrunk sizes
    # must be spelled out here), image_token_index 32000, pad 32001, vocab 32064.
    return {
        "architectures": ["LlavaForConditionalGeneration"],
        "ignore_index": -100,
        "image_seq_length": 576,
        "image_token_index": 32000,
        "initializer_range": init,
        "model_type": "llava",
        "pad_token_id": 32001,
        "projector_hidden_act": "gelu",
        "text_config": {
            "_name_or_path": "lmsys/vicuna-7b-v1.5",
            "architectures": ["LlamaForCausalLM"],
            "hidden_size": 64,  # Llama default 4096
            "initializer_range": init,
            "intermediate_size": 128,  # 11008
            "max_position_embeddings": 4096,
            "model_type": "llama",
            "num_attention_heads": 4,  # 32
            "num_hidden_layers": 2,  # 32
            "num_key_value_heads": 4,  # 32
            "pad_token_id": 0,
            "rms_norm_eps": 1e-05,
            "torch_dtype": "float16",
            "vocab_size": 32064,
        },
        "tie_word_embeddings": False,
        "torch_dtype": "float16",
        "transformers_version": "4.36.0.dev0",
        "vision_config": {
            "hidden_size": 32,  # real 1024
            "image_size": 336,
            "initializer_range": init,
            "intermediate_size": 64,  # real 4096
            "model_type": "clip_vision_model",
            "num_attention_heads": 2,  # real 16
            "num_hidden_layers": 2,  # real 24
            "patch_size": 14,
            "projection_dim": 768,
            "vocab_size": 32000,
        },
        "vision_feature_layer": -2,
        "vision_feature_select_strategy": "default",
        "vocab_size": 32064,
    }


_CONFIGS = {"qwen2_vl": _qwen2_vl_config, "qwen2_5_vl": _qwen2_5_vl_config, "qwen3_vl": _qwen3_vl_config,
            "llava": _llava_config}

_GENERATION = {
    "qwen2_vl": {"bos_token_id": 151643, "pad_token_id": 151643, "do_sample": True,
                 "eos_token_id": [151645, 151643], "repetition_penalty": 1.0, "temperature": 0.01,
                 "top_p": 0.001, "top_k": 1, "transformers_version": "4.37.0"},
    "qwen2_5_vl": {"bos_token_id": 151643, "pad_token_id": 151643, "do_sample": True,
                   "eos_token_id": [151645, 151643], "repetition_penalty": 1.05, "temperature": 0.1,
                   "top_p": 0.001, "top_k": 1, "transformers_version": "4.49.0.dev0"},
    "qwen3_vl": {"bos_token_id": 151643, "pad_token_id": 151643, "do_sample": True,
                 "eos_token_id": [151645, 151643], "top_k": 20, "top_p": 0.8, "repetition_penalty": 1.0,
                 "temperature": 0.7, "transformers_version": "4.56.0"},
    "llava": {"_from_model_config": True, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 32001,
              "transformers_version": "4.36.0.dev0"},
}


def _preprocessor(family: str) -> dict:
    if family in ("qwen2_vl", "qwen2_5_vl"):
        return {
            "min_pixels": 3136,
            "max_pixels": 12845056,
            "patch_size": 14,
            "temporal_patch_size": 2,
            "merge_size": 2,
            "image_mean": CLIP_MEAN,
            "image_std": CLIP_STD,
            "image_processor_type": "Qwen2VLImageProcessor",
            "processor_class": "Qwen2VLProcessor" if family == "qwen2_vl" else "Qwen2_5_VLProcessor",
        }
    if family == "qwen3_vl":
        return {
            "size": {"longest_edge": 16777216, "shortest_edge": 65536},
            "patch_size": 16,
            "temporal_patch_size": 2,
            "merge_size": 2,
            "image_mean": [0.5, 0.5, 0.5],
            "image_std": [0.5, 0.5, 0.5],
            "processor_class": "Qwen3VLProcessor",
            "image_processor_type": "Qwen2VLImageProcessorFast",
        }
    return {
        "crop_size": {"height": 336, "width": 336},
        "do_center_crop": True,
        "do_convert_rgb": True,
        "do_normalize": True,
        "do_rescale": True,
        "do_resize": True,
        "image_mean": CLIP_MEAN,
        "image_processor_type": "CLIPImageProcessor",
        "image_std": CLIP_STD,
        "processor_class": "LlavaProcessor",
        "resample": 3,
        "rescale_factor": 0.00392156862745098,
        "size": {"shortest_edge": 336},
    }


QWEN3_VIDEO_PREPROCESSOR = {
    "size": {"longest_edge": 25165824, "shortest_edge": 4096},
    "patch_size": 16,
    "temporal_patch_size": 2,
    "merge_size": 2,
    "image_mean": [0.5, 0.5, 0.5],
    "image_std": [0.5, 0.5, 0.5],
    "processor_class": "Qwen3VLProcessor",
    "video_processor_type": "Qwen3VLVideoProcessor",
}

LLAVA_PROCESSOR_CONFIG = {
    "image_token": "<image>",
    "num_additional_image_tokens": 1,
    "patch_size": 14,
    "processor_class": "LlavaProcessor",
    "vision_feature_select_strategy": "default",
}

# ---------------------------------------------------------------------------------------------
# Weights: the model class built from the config, saved with the real checkpoint's key names.
# ---------------------------------------------------------------------------------------------

def _legacy_key(family: str, key: str) -> str:
    """transformers >= 4.52 state-dict names -> the names in the older real checkpoints."""
    if family in ("qwen2_vl", "qwen2_5_vl"):
        if key.startswith("model.language_model."):
            return "model." + key[len("model.language_model."):]
        if key.startswith("model.visual."):
            return key[len("model."):]
        return key
    if family == "llava":
        if key.startswith("model.language_model."):
            return "language_model.model." + key[len("model.language_model."):]
        if key.startswith("model.vision_tower."):
            return "vision_tower." + key[len("model.vision_tower."):]
        if key.startswith("model.multi_modal_projector."):
            return "multi_modal_projector." + key[len("model.multi_modal_projector."):]
        if key == "lm_head.weight":
            return "language_model.lm_head.weight"
        return key
    return key


def _write_weights(family: str, cfg_dict: dict, out: Path, seed: int, dtype) -> None:
    import torch
    import transformers as tf
    from safetensors.torch import save_file

    cfg_file = out / "config.json"
    _write_json(cfg_file, cfg_dict)
    config = tf.AutoConfig.from_pretrained(str(out))
    torch.manual_seed(seed)
    model = tf.AutoModelForImageTextToText.from_config(config, dtype=torch.float32)
    state = model.state_dict()
    tied = bool(getattr(config.get_text_config(), "tie_word_embeddings", False) or
                getattr(config, "tie_word_embeddings", False))
    tensors = {}
    for k, v in state.items():
        if tied and k == "lm_head.weight":
            continue  # tied to the embedding table: the real tied checkpoints do not store it
        tensors[_legacy_key(family, k)] = v.detach().to(dtype).contiguous()
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})


# ---------------------------------------------------------------------------------------------

def build_real_layout(family: str, out_dir, *, template: str = "json", seed: int = 0,
                      init_std: float = 0.1, weights_dtype: str = "bfloat16", vocab_size: int = 400) -> Path:
    """Write a scaled-down copy of `family`'s real Hugging Face download into `out_dir`.

    `template="json"` writes the multimodal chat template as chat_template.json (as the real
    downloads do); `template="jinja"` as chat_template.jinja (transformers' newer save format;
    the tokenizer then also picks it up, as transformers does with such a folder).
    """
    import torch

    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; one of {FAMILIES}")
    if template not in ("json", "jinja"):
        raise ValueError("template must be 'json' or 'jinja'")
    out = Path(out_dir)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)

    if family == "llava":
        _llava_tokenizer_files(out, vocab_size)
        mm_template, tok_template = LLAVA_TEMPLATE, None
    else:
        _qwen_tokenizer_files(family, out, vocab_size)
        mm_template = QWEN3_VL_TEMPLATE if family == "qwen3_vl" else QWEN2_VL_TEMPLATE
        tok_template = {"qwen2_vl": QWEN2_VL_TEMPLATE, "qwen2_5_vl": QWEN2_5_TEXT_TEMPLATE,
                        "qwen3_vl": QWEN3_TEXT_TEMPLATE}[family]
    tk_path = out / "tokenizer_config.json"
    tk = json.loads(tk_path.read_text())
    if tok_template is None:
        tk.pop("chat_template", None)
    else:
        tk["chat_template"] = tok_template
    _write_json(tk_path, tk)

    if template == "json":
        _write_json(out / "chat_template.json", {"chat_template": mm_template})
    else:
        (out / "chat_template.jinja").write_text(mm_template)

    _write_json(out / "preprocessor_config.json", _preprocessor(family))
    if family == "qwen3_vl":
        _write_json(out / "video_preprocessor_config.json", QWEN3_VIDEO_PREPROCESSOR)
    if family == "llava":
        _write_json(out / "processor_config.json", LLAVA_PROCESSOR_CONFIG)
    _write_json(out / "generation_config.json", _GENERATION[family])
    _write_weights(family, _CONFIGS[family](init_std), out, seed, getattr(torch, weights_dtype))
    return out
