"""Prompts: how each modality is wrapped before the queries are appended (torch-free).

One class for the library (`SLQEncoder`, the input builders) and for params.yaml's `prompts`
section (slq.mlops.config), so the reference recipe is written once.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Prompts:
    """How each modality is wrapped before the queries are appended.

    The defaults are the reference recipe (CnFaker/SLQ): the model's own chat template, the
    user turn holding the caption alone (or the image alone, with an empty instruction), then the
    opened assistant turn (`add_generation_prompt`), then the queries. Templates fill `{text}`;
    `image` is an optional instruction after a plain image. `system`: None keeps what the family's
    template does without a system message (Qwen2-VL and Qwen2.5-VL insert "You are a helpful
    assistant.", Qwen3-VL nothing): that is what the reference's `apply_chat_template` gives.
    A string sends it as a system message instead.
    """

    text: str = "{text}"
    image: str = ""
    multimodal: str = "{text}"
    add_generation_prompt: bool = True
    system: str | None = None

    def to_dict(self) -> dict:
        return dict(self.__dict__)

    @classmethod
    def from_dict(cls, d: dict | None) -> Prompts:
        """From a manifest or params dict; a checkpoint written before `system` existed gets None."""
        d = dict(d or {})
        names = {f for f in cls.__dataclass_fields__}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown prompt field(s) {unknown}; known: {sorted(names)}")
        return cls(**d)
