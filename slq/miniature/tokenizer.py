"""A small byte-level BPE tokenizer, built locally (no hub), for the tiny backbones.

Byte-level BPE never meets an unknown character, so any user text (captions, search
queries) tokenizes. Training is deterministic for a given corpus and vocabulary size.
"""

from __future__ import annotations

from collections.abc import Iterable

# A short, fixed English corpus so that common words get their own merges even when
# no domain corpus is given. Not training data for anything: only tokenizer merges.
BASE_CORPUS = """
a an the this that these those is are was were be been of in on at to from with and or but
not no yes one two three four five six seven eight nine ten left right top bottom middle
center above below near next beside small large big tiny red green blue yellow orange purple
pink white black gray brown circle square triangle star shape shapes image picture photo
describe modify summarize word sentence caption question answer what which where how many
color colour colours sky grass sun has have sides side corner corners there here it its
""".split()

QWEN_SPECIALS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]
LLAVA_SPECIALS = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]


def build_bpe_tokenizer(specials: list[str], corpus: Iterable[str] = (), vocab_size: int = 1024):
    """Train a byte-level BPE `tokenizers.Tokenizer` with `specials` as added tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(specials),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    lines = [" ".join(BASE_CORPUS)] * 4 + [str(s) for s in corpus]
    tok.train_from_iterator(lines, trainer=trainer)
    return tok


def wrap_fast(tok, **special_tokens):
    """Wrap a `tokenizers.Tokenizer` as a transformers fast tokenizer."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=tok, **special_tokens)
