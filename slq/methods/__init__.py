"""The ways of turning an MLLM into an embedder that SLQ is compared with, as in the paper: one
class per method, one file each, registered once by name.

- `slq` (slq.py): the backbone frozen; shared latent queries appended to every input; mean of
  their last hidden states. Trains the queries (+ temperature).
- `zero_shot` (zero_shot.py): no training. An E5-V style instruction ("Summarize the above ... in
  one word:") and the last token's last hidden state.
- `lora` (lora.py): LoRA adapters (peft) on the LLM's linear layers, trained contrastively;
  pooling by the last token (with the zero-shot prompt, as E5-V) or by latent queries trained alongside.
- `full` (full.py): every LLM weight trained contrastively (the vision tower stays frozen); last-token pooling.

Every method subclasses `MethodEncoder` (base.py), itself `slq.encoder.SLQEncoder`, so all share
the inputs, batching, loss, evaluation and checkpoint folder. A checkpoint's manifest records the
method's name; `get_method(name)` (or `SLQEncoder.from_pretrained(queries=ckpt)`, which goes
through it) gives its class. What differs by method is in the class, never switched on its name
elsewhere: the poolings it takes (`poolings`, the first its default), what it trains
(`train_llm`, `trains`), whether the split forward is exact (`split_exact`), what a checkpoint
holds and how it loads (`llm_tensors`, `load_llm`, `method_manifest`, `manifest_options`), and the
pipeline's defaults (`default_prompt`, `default_lr`; `reference`: the method the others are
compared with).

Adding a fifth method is one new file here, imported below:

    from slq.methods.base import MethodEncoder, register_method

    @register_method("prefix")
    class Prefix(MethodEncoder):
        poolings = ("last_token",)
        default_lr = 1e-3
        def train_llm(self): ...            # unfreeze and return what trains in the LLM
        def llm_tensors(self): ...          # what a checkpoint keeps of it
        def load_llm(self, ckpt_dir, resume): ...

then `train.method: prefix` or `methods.compare: [..., prefix]` (with its `methods.lr` / `pooling`
/ `prompts` entries) run it, and its checkpoints load by their manifest's `method`.
"""

from slq.methods.base import (
    DEFAULT_METHOD,
    METHODS,
    POOLINGS,
    SUMMARIZE_PROMPTS,
    MethodEncoder,
    MethodError,
    check_method,
    compared_methods,
    from_pretrained,
    get_method,
    reference_method,
    register_method,
)

# isort: off
# Importing the method modules registers them, in this order (METHODS lists them so).
from slq.methods.slq import SLQ
from slq.methods.zero_shot import ZeroShot
from slq.methods.lora import LORA_TARGETS, LoRA, LoraSpec, apply_lora
from slq.methods.full import Full, unfreeze_llm
# isort: on

__all__ = [
    "DEFAULT_METHOD",
    "LORA_TARGETS",
    "METHODS",
    "POOLINGS",
    "SLQ",
    "SUMMARIZE_PROMPTS",
    "Full",
    "LoRA",
    "LoraSpec",
    "MethodEncoder",
    "MethodError",
    "ZeroShot",
    "apply_lora",
    "check_method",
    "compared_methods",
    "from_pretrained",
    "get_method",
    "reference_method",
    "register_method",
    "unfreeze_llm",
]
