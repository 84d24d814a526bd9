"""`zero_shot`: no training. An E5-V style instruction ("Summarize the above ... in one word:")
and the last token's last hidden state."""

from __future__ import annotations

from slq.methods.base import MethodEncoder, register_method


@register_method("zero_shot")
class ZeroShot(MethodEncoder):
    """The backbone as it is: nothing trains, a checkpoint holds no weights (its manifest says how
    to embed)."""

    poolings = ("last_token",)
    trains = False
    default_prompt = "summarize"
