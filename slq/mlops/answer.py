"""Answers from the same weights: retrieve with a query bank, then generate with the frozen backbone
that just embedded the question (POST /answer on the search service, `slq serve --search --answer`).

SLQ never changes the backbone, so the model that retrieves is still the instruction-tuned LM it
was: the service's one loaded copy both embeds (the queries' last hidden states, no lm_head) and
generates (its own `generate`, greedy). Nothing is loaded twice: `Answerer.model` is the encoder's
backbone model, the same object (bench/bench_answer.py measures the process's resident memory with
retrieval alone and with retrieval + generation).

The prompt: the retrieved captions as numbered context, then the question, in the backbone's chat
template (its processor's), with the generation prompt. Answer quality depends on the backbone:
the built-in tiny one answers with noise; SmolLM2-135M-Instruct answers in English.
"""

from __future__ import annotations

import threading

import torch

SYSTEM = "Answer the question using the context. Be brief."


def answer_prompt(question: str, contexts: list[str]) -> str:
    """The user message: numbered context passages, then the question."""
    lines = [f"[{i}] {c}" for i, c in enumerate(contexts, 1) if c]
    ctx = "\n".join(lines) if lines else "(no context found)"
    return f"{SYSTEM}\n\nContext:\n{ctx}\n\nQuestion: {question}"


class Answerer:
    """Greedy generation with a loaded backbone adapter's own model (one copy of the weights)."""

    def __init__(self, backbone, lock: threading.Lock | None = None):
        self.backbone = backbone
        self.model = backbone.model  # the generation wrapper the encoder embeds through (model.model)
        self.lock = lock or threading.Lock()
        if not hasattr(self.model, "generate") or getattr(self.model, "lm_head", None) is None:
            raise ValueError(f"the backbone {backbone.source} was loaded without its language-model head; "
                             "it cannot generate")

    def chat_text(self, user: str) -> str:
        messages = [{"role": "user", "content": [{"type": "text", "text": user}]}]
        proc = self.backbone.processor
        try:
            return proc.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except (ValueError, AttributeError, TypeError):  # a tokenizer-only template takes plain strings
            return self.backbone.tokenizer.apply_chat_template([{"role": "user", "content": user}], tokenize=False,
                                                               add_generation_prompt=True)

    @torch.no_grad()
    def generate(self, question: str, contexts: list[str], max_new_tokens: int) -> dict:
        """{"answer", "prompt_tokens", "completion_tokens"}: greedy, at most `max_new_tokens`."""
        tok = self.backbone.tokenizer
        text = self.chat_text(answer_prompt(question, contexts))
        enc = tok(text, return_tensors="pt", add_special_tokens=False)
        device = self.backbone.device
        ids, mask = enc["input_ids"].to(device), enc["attention_mask"].to(device)
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        with self.lock:
            out = self.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                      do_sample=False, pad_token_id=pad)
        new = out[0, ids.shape[1]:]
        return {"answer": tok.decode(new, skip_special_tokens=True).strip(), "prompt_tokens": int(ids.shape[1]),
                "completion_tokens": int(new.shape[0])}
