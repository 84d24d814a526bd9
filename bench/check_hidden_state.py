"""Which hidden state SLQ pools, per family: the decoder's output after its final norm, or before it.

vLLM's poolers read the state after the final RMSNorm; transformers' `hidden_states[-1]` was, for
Qwen3-VL in some versions, the last layer's output before it (vllm issue 33167). SLQ's queries read
the language model's `last_hidden_state`. This builds a tiny random model of every family, gives its
final norm a non-trivial weight (with unit weight RMSNorm is idempotent and the two cannot be told
apart), and prints which state each of the three is. CPU, a few seconds:

    python bench/check_hidden_state.py
"""

import tempfile
from pathlib import Path

import torch

from slq.backbones import load_backbone
from slq.miniature.tiny import TINY_TYPES, build_tiny_backbone


def main() -> None:
    import transformers

    torch.manual_seed(0)
    print(f"transformers {transformers.__version__}, torch {torch.__version__}")
    for model_type in TINY_TYPES:
        folder = build_tiny_backbone(model_type, Path(tempfile.mkdtemp()) / model_type)
        lm = load_backbone(folder, dtype="float32", device="cpu").decoder  # the language model SLQ runs
        with torch.no_grad():
            lm.norm.weight.copy_(torch.rand_like(lm.norm.weight) + 0.5)
        seen = {}
        lm.layers[-1].register_forward_hook(lambda m, i, o: seen.setdefault("pre", o[0] if isinstance(o, tuple) else o))
        out = lm(input_ids=torch.randint(10, 200, (2, 7)), output_hidden_states=True)
        post = lm.norm(seen["pre"])
        print(f"{model_type:11s} last_hidden_state is after the final norm: "
              f"{torch.allclose(out.last_hidden_state, post, atol=1e-5)}; hidden_states[-1] is after it: "
              f"{torch.allclose(out.hidden_states[-1], post, atol=1e-5)}")


if __name__ == "__main__":
    main()
