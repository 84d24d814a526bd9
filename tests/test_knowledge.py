"""The knowledge probe: answers ranked by the frozen LM's own log-likelihood,
and cues that no training text states."""

import random

import pytest
import torch

from slq.miniature import knowledge
from slq.miniature.world import COLOURS, COUNT_WORDS, SHAPES, _captions
from slq.miniature.pretrain import fact_sentences, make_example, pretraining_scenes


@pytest.fixture(scope="module")
def tiny_lm():
    import transformers as tf

    from slq.miniature.tokenizer import build_bpe_tokenizer, wrap_fast

    corpus = [q.format(cue=c) + " " + a for k, a, c in knowledge.all_cues() for q in [knowledge.QUESTIONS[k]]]
    tok = wrap_fast(build_bpe_tokenizer(["<pad>"], corpus, vocab_size=400), pad_token="<pad>")
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=256,
                         initializer_range=0.5)
    return tf.LlamaForCausalLM(cfg).eval(), tok


def test_the_answers_are_the_worlds_words():
    assert set(knowledge.answers("colour")) == set(COLOURS)
    assert set(knowledge.answers("shape")) == set(SHAPES)
    assert set(knowledge.answers("count")) == set(COUNT_WORDS.values())


def test_scores_are_the_candidates_log_likelihood(tiny_lm):
    """Against a token-by-token computation: each next token's log-probability given all before it."""
    model, tok = tiny_lm
    prompt = knowledge.QUESTIONS["colour"].format(cue="a ripe banana")
    cands = ["yellow", "blue", "purple"]
    got = knowledge.score_answers(model, tok, prompt, cands)
    p = tok(prompt, add_special_tokens=False)["input_ids"]
    for cand, score in zip(cands, got):
        full = tok(prompt + " " + cand, add_special_tokens=False)["input_ids"]
        want = 0.0
        for j in range(len(p), len(full)):
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([full[:j]])).logits[0, -1]
            want += float(logits.log_softmax(-1)[full[j]])
        assert score == pytest.approx(want, abs=1e-4)
    assert len(set(got)) == len(got)


def test_probe_ranks_and_reports_the_margin(monkeypatch):
    """Scores made up per prompt: the content-free question favours "red"; after it is
    subtracted, the banana's question favours yellow although "red" has the higher raw score."""
    table = {
        "Question: What colour is it?\nAnswer:": {"red": -1.0, "yellow": -4.0, "white": -4.0},
        "Question: What colour is a ripe banana?\nAnswer:": {"red": -1.5, "yellow": -2.0, "white": -4.0},
        "Question: What colour is snow?\nAnswer:": {"red": -2.0, "yellow": -5.0, "white": -2.5},
    }

    def fake(model, tokenizer, prompt, cands):
        return [table[prompt].get(c, -10.0) for c in cands]

    monkeypatch.setattr(knowledge, "score_answers", fake)
    cues = [("colour", "yellow", "a ripe banana"), ("colour", "white", "snow")]
    rows = knowledge.probe(None, None, cues)
    assert [r["known"] for r in rows] == [True, True]
    assert [r["raw_known"] for r in rows] == [False, False] and rows[0]["raw_best"] == "red"
    assert rows[0]["margin"] == pytest.approx(2.0)  # yellow +2.0; the best other is 0 (red -0.5, white 0, others 0)
    raw = knowledge.probe(None, None, cues, calibrate=False)
    assert [r["known"] for r in raw] == [False, False] and raw[1]["margin"] == pytest.approx(-0.5)
    assert knowledge.known_cues(rows) == {("colour", "yellow"): ["a ripe banana"], ("colour", "white"): ["snow"]}


def test_check_unseen_names_the_cue_and_the_text():
    with pytest.raises(ValueError, match="'a ripe tomato' is stated in training text #1"):
        knowledge.check_unseen({("colour", "red"): ["a ripe tomato"]}, ["a red circle", "the colour of A RIPE tomato"])
    knowledge.check_unseen(["snow"], ["a snowy field"])  # a word, not a substring


def test_the_default_worlds_pretraining_states_its_facts_but_captions_and_visual_chats_do_not():
    """Why the default knowledge split measures taught facts: the tiny backbone's fact sentences
    state cues such as "a ripe tomato". The real-LM recipe (captions and questions about images
    only) and the world's captions state none of the cues."""
    with pytest.raises(ValueError, match="stated in training text"):
        knowledge.check_unseen(dict.fromkeys([("all", "")], [c for _, _, c in knowledge.all_cues()]), fact_sentences())
    rng = random.Random(0)
    scenes = pretraining_scenes(300, 0, set())
    texts = []
    for i, s in enumerate(scenes):
        texts += _captions(s, 2, rng)
        texts.append(make_example("caption", s, i, rng)["answer"])
        texts += [q + " " + a for q, a in make_example("qa_image", s, i, rng)["turns"]]
    knowledge.check_unseen([c for _, _, c in knowledge.all_cues()], texts)


def test_no_cue_contains_an_answer_word():
    words = [a for k in ("colour", "shape", "count") for a in knowledge.answers(k)]
    leaks = [(cue, w) for _, _, cue in knowledge.all_cues() for w in words if w in cue.lower()]
    assert not leaks, leaks
