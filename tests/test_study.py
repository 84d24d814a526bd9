"""The seed study (slq.miniature.study, `slq study seeds`): its statistics on hand-made numbers, its cache,
and the command, with the per-seed runner replaced by a cheap fake (no model is trained here)."""

import json
import math
import statistics
from pathlib import Path

import pytest

from slq.miniature import study
from slq.mlops.config import load_config

# two-sided 95% Student-t critical values, n - 1 degrees of freedom (tables; scipy checks them below)
T95 = {2: 12.706204736174698, 3: 4.302652729749464, 5: 2.7764451051977934}
BASE = {"slq": 0.30, "zero_shot": 0.001, "lora": 0.20, "full": 0.25}
SPLITS = ("world", "world_knowledge")
CALLS = []


def fake_scores(seed: int, methods=tuple(BASE)) -> dict:
    """Made-up but seed-dependent numbers: method m, seed k -> BASE[m] + 0.01 k^2 (+ 0.005 k for slq)."""
    return {m: {s: {"t2i_R@1": BASE[m] + 0.01 * seed ** 2 + (0.005 * seed if m == "slq" else 0.0) - 0.1 * i,
                    "i2t_R@1": BASE[m] + 0.02 * seed}
                for i, s in enumerate(SPLITS)} for m in methods}


def fake_step(cfg, job, step, on_event=None):
    """Stands in for study.run_step: records (seed, step), and writes what the step would keep in the
    seed's folder (a method's step refuses to run before its seed's pretraining has finished)."""
    import time

    CALLS.append((job.seed, step))
    on_event = on_event or (lambda kind, detail: None)
    d, b = Path(job.dir), job.bdir
    d.mkdir(parents=True, exist_ok=True)
    b.mkdir(parents=True, exist_ok=True)
    start = time.time()
    if step == "pretrain":
        on_event("pretrain", None)
        if job.seed in getattr(cfg, "_crash_seeds", ()):
            raise RuntimeError(f"seed {job.seed} crashed")
        time.sleep(getattr(cfg, "_pretrain_s", 0.0))
        out = {"loss_last10": 1.0 + job.seed / 10, "fact_accuracy": 0.9, "wall_time_s": 1.0}
    else:
        assert (b / "fake_pretrain.json").is_file(), f"seed {job.seed}: {step} ran before its pretraining"
        on_event("train", (step, cfg.train.steps))
        on_event("evaluate", step)
        if (job.seed, step) in getattr(cfg, "_crash_steps", ()):
            raise RuntimeError(f"seed {job.seed} {step} crashed")
        out = {s: v for s, v in fake_scores(job.seed)[step].items() if s in job.splits}
        on_event("method", step)
    (b if step == "pretrain" else d).joinpath(f"fake_{step}.json").write_text(
        json.dumps({"out": out, "start": start, "end": time.time()}))
    if step == "pretrain":  # what the real pretrain step leaves: the backbone is ready for any recipe's methods
        (b / study.PRETRAINED).write_text(json.dumps({"captions_n": job.captions}))


def fake_collect(cfg, job):
    """Stands in for study.collect_seed: the seed's result from fake_step's files."""
    read = lambda step: json.loads(((job.bdir if step == "pretrain" else Path(job.dir)) / f"fake_{step}.json")
                                   .read_text())
    return {"scores": {m: read(m)["out"] for m in job.methods}, "pretrain": read("pretrain")["out"]}


FAKE = {"step_runner": fake_step, "collect": fake_collect, "progress": False}


def pretrained_seeds() -> list[int]:
    """The seeds whose pretraining step ran (in this process), in order."""
    return [s for s, step in CALLS if step == "pretrain"]


def results(seeds, methods=tuple(BASE)) -> list[dict]:
    return [{"seed": s, "scores": fake_scores(s, methods)} for s in seeds]


def row(agg, key, method, split="world", metric="t2i_R@1") -> dict:
    return next(r for r in agg[key] if r["method"] == method and r["split"] == split and r["metric"] == metric)


# ---- statistics -----------------------------------------------------------------------------

def test_t_quantiles_match_the_table_and_scipy():
    from scipy import stats

    for n, t in T95.items():
        assert study.t_quantile(n) == pytest.approx(t, rel=1e-9)
        assert stats.t.ppf(0.975, n - 1) == pytest.approx(t, rel=1e-9)


@pytest.mark.parametrize("xs", [[0.3, 0.5], [0.1, 0.2, 0.6], [0.31, 0.28, 0.45, 0.22, 0.36]])
def test_describe_by_hand(xs):
    n = len(xs)
    mean = sum(xs) / n
    sd = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1))
    half = T95[n] * sd / math.sqrt(n)
    d = study.describe(xs)
    assert d["n"] == n and d["note"] is None
    assert d["mean"] == pytest.approx(mean) and d["sd"] == pytest.approx(statistics.stdev(xs))
    assert (d["ci_low"], d["ci_high"]) == pytest.approx((mean - half, mean + half))


def test_describe_n2_worked_example():
    # [0.3, 0.5]: mean 0.4, sd sqrt(0.02) = 0.1414, half-width 12.706 x 0.1414 / sqrt 2 = 1.2706
    d = study.describe([0.3, 0.5])
    assert d["sd"] == pytest.approx(0.14142135623730953)
    assert (d["ci_low"], d["ci_high"]) == pytest.approx((0.4 - 1.2706204736174698, 0.4 + 1.2706204736174698))


def test_describe_one_value_has_no_interval_and_says_so():
    d = study.describe([0.42])
    assert d["mean"] == 0.42 and d["sd"] is None and d["ci_low"] is None and d["ci_high"] is None
    assert "n=1" in d["note"]
    with pytest.raises(study.StudyError):
        study.describe([])


def test_aggregate_means_intervals_and_paired_differences():
    seeds = [0, 1, 2, 3, 4]
    agg = study.aggregate(results(seeds), splits=SPLITS)
    assert agg["n"] == 5 and agg["seeds"] == seeds and agg["baseline"] == "slq"
    # spread over seeds, checked against scipy's interval
    from scipy import stats

    lora = [fake_scores(s)["lora"]["world"]["t2i_R@1"] for s in seeds]
    r = row(agg, "summary", "lora")
    lo, hi = stats.t.interval(0.95, df=4, loc=statistics.mean(lora), scale=stats.sem(lora))
    assert r["mean"] == pytest.approx(statistics.mean(lora)) and r["sd"] == pytest.approx(statistics.stdev(lora))
    assert (r["ci_low"], r["ci_high"]) == pytest.approx((lo, hi))
    # paired: the per-seed differences slq - lora = 0.1 + 0.005 k, whose sd is small although each
    # method's own spread (0.01 k^2) is large: the pairing removes the shared seed effect
    p = row(agg, "paired", "slq - lora")
    diffs = [0.1 + 0.005 * s for s in seeds]
    assert p["baseline"] == "lora" and p["seeds"] == seeds and p["values"] == pytest.approx(diffs)
    assert p["mean"] == pytest.approx(0.11) and p["sd"] == pytest.approx(statistics.stdev(diffs))
    half = T95[5] * statistics.stdev(diffs) / math.sqrt(5)
    assert (p["ci_low"], p["ci_high"]) == pytest.approx((0.11 - half, 0.11 + half))
    assert p["ci_high"] - p["ci_low"] < r["ci_high"] - r["ci_low"]
    # every (method, split, metric) once; three baselines; one value per seed per row
    assert len(agg["summary"]) == 4 * 2 * 2 and len(agg["paired"]) == 3 * 2 * 2
    assert {q["method"] for q in agg["paired"]} == {"slq - zero_shot", "slq - lora", "slq - full"}
    assert len(agg["per_seed"]) == 5 * 4 * 2 * 2
    json.dumps(agg)  # JSON as it is


def test_aggregate_one_seed_reports_no_interval():
    agg = study.aggregate(results([3]), splits=SPLITS)
    assert all(r["sd"] is None and r["ci_low"] is None and "n=1" in r["note"] for r in agg["summary"] + agg["paired"])
    md = study.markdown(agg)
    assert "n=1, no interval" in md and "# Seed study: 1 pretraining seed\n" in md


def test_aggregate_missing_method_is_an_error_or_left_out():
    res = results([0, 1, 2])
    del res[1]["scores"]["lora"]
    with pytest.raises(study.StudyError, match="seed 1 has no lora world t2i_R@1"):
        study.aggregate(res, methods=list(BASE), splits=SPLITS)
    agg = study.aggregate(res, methods=list(BASE), splits=SPLITS, allow_missing=True)
    r = row(agg, "summary", "lora")
    assert r["n"] == 2 and r["seeds"] == [0, 2]
    assert row(agg, "summary", "slq")["n"] == 3
    p = row(agg, "paired", "slq - lora")
    assert p["seeds"] == [0, 2] and p["n"] == 2
    assert "| 1 | lora | - |" in study.markdown(agg)


def test_aggregate_rejects_duplicates_and_nothing():
    with pytest.raises(study.StudyError, match="twice"):
        study.aggregate(results([0, 0]), splits=SPLITS)
    with pytest.raises(study.StudyError, match="no seed results"):
        study.aggregate([], splits=SPLITS)


def test_markdown_table_layout():
    agg = study.aggregate(results([0, 1, 2]), splits=SPLITS)
    md = study.markdown(agg, header={"recipe key": "abc"})
    assert "- recipe key: abc" in md and "Student t, n - 1 degrees of freedom" in md
    assert "| method | world t2i R@1 | world i2t R@1 | world_knowledge t2i R@1 | world_knowledge i2t R@1 |" in md
    slq = row(agg, "summary", "slq")
    assert f"| slq | {slq['mean']:.3f} ± {slq['sd']:.3f} [{slq['ci_low']:.3f}, {slq['ci_high']:.3f}] |" in md
    assert "| slq - lora | +0." in md and "## Per seed" in md and "| 2 | full |" in md


# ---- the cache ------------------------------------------------------------------------------

@pytest.fixture
def cfg(tmp_path):
    CALLS.clear()
    return load_config(None, {"root": str(tmp_path), "train.steps": 7})


def test_rerun_with_more_seeds_runs_only_the_new_ones(cfg, tmp_path):
    first = study.run_study(cfg, range(3), "studies", jobs=1, **FAKE)
    assert CALLS == [(s, step) for s in range(3) for step in ("pretrain", *BASE)]  # one job: seed by seed
    assert first.ran == [0, 1, 2] and first.cached == []
    CALLS.clear()
    second = study.run_study(cfg, range(5), "studies", jobs=1, **FAKE)
    assert pretrained_seeds() == [3, 4] and second.cached == [0, 1, 2] and second.ran == [3, 4]
    assert [r["seed"] for r in second.results] == [0, 1, 2, 3, 4] and second.key == first.key
    res = json.loads((tmp_path / "studies" / first.key / "seed_4" / study.RESULT).read_text())
    assert res["seed"] == 4 and res["scores"]["slq"]["world"]["t2i_R@1"] == pytest.approx(0.30 + 0.16 + 0.02)
    assert set(res["step_s"]) == {"pretrain", *BASE} and res["wall_s"] == pytest.approx(sum(res["step_s"].values()))
    assert json.loads((tmp_path / "studies" / first.key / "recipe.json").read_text())["train"]["steps"] == 7


def test_changed_recipe_reruns_a_path_does_not(cfg):
    a = study.run_study(cfg, range(2), "studies", jobs=1, **FAKE)
    CALLS.clear()
    cfg.train.out = "elsewhere/slq"  # where outputs go: not the recipe
    cfg.pretrain.seed = 99  # the study sets each seed itself
    assert study.run_study(cfg, range(2), "studies", jobs=1, **FAKE).key == a.key
    assert CALLS == []
    cfg.pretrain.steps *= 2
    b = study.run_study(cfg, range(2), "studies", jobs=1, **FAKE)
    assert b.key != a.key and pretrained_seeds() == [0, 1]
    CALLS.clear()
    cfg.methods.lr = dict(cfg.methods.lr, lora=0.01)  # a method's recipe: a new study on the same backbones
    c = study.run_study(cfg, [0], "studies", jobs=1, **FAKE)
    assert c.key not in (a.key, b.key) and pretrained_seeds() == [] and CALLS == [(0, m) for m in BASE]
    assert "pretrain" not in c.results[0]["step_s"]
    assert c.results[0]["pretrain"] == b.results[0]["pretrain"]  # the backbone's record, from its own folder


def test_a_changed_method_recipe_trains_on_the_pretrained_backbones(cfg, tmp_path):
    """Backbones are kept by the backbone key (data + pretraining), apart from the study's: a new
    query count is a new study, trained on the backbones already there; new captions redo the
    pretrain step (it reuses the model and captions again); a new pretraining recipe pretrains."""
    a = study.run_study(cfg, range(2), "studies", jobs=1, **FAKE)
    bkey = study.recipe_key(study.backbone_recipe(cfg))
    for s in range(2):
        assert (tmp_path / "studies" / "backbones" / bkey / f"seed_{s}" / "fake_pretrain.json").is_file()
        assert not (tmp_path / "studies" / a.key / f"seed_{s}" / "fake_pretrain.json").exists()
    CALLS.clear()
    cfg.train.num_queries = 64
    cfg.prompts.text = "{text}"
    b = study.run_study(cfg, range(3), "studies", jobs=1, **FAKE)  # seed 2 is new: it pretrains
    assert b.key != a.key and study.recipe_key(study.backbone_recipe(cfg)) == bkey
    assert CALLS == [*[(s, m) for s in range(2) for m in BASE], (2, "pretrain"), *[(2, m) for m in BASE]]
    assert [r["seed"] for r in b.results] == [0, 1, 2]
    bdir = tmp_path / "studies" / "backbones" / bkey / "seed_0"
    job = lambda captions: study.SeedJob(0, tmp_path / "x", list(BASE), list(SPLITS), captions, backbone_dir=bdir)
    assert study.seed_steps(job(0)) == list(BASE)
    assert study.seed_steps(job(5)) == ["pretrain", *BASE]  # not the captions the backbone has: the step again
    (bdir / study.PRETRAINED).write_text(json.dumps({"captions_n": 5}))
    assert study.seed_steps(job(5)) == study.seed_steps(job(0)) == list(BASE)  # none asked: any will do
    CALLS.clear()
    cfg.pretrain.lr = 0.001
    assert study.recipe_key(study.backbone_recipe(cfg)) != bkey
    study.run_study(cfg, [0], "studies", jobs=1, **FAKE)
    assert pretrained_seeds() == [0]


def test_the_backbone_key_holds_the_data_and_the_pretraining_only(cfg):
    key = lambda: study.recipe_key(study.backbone_recipe(cfg))
    base = key()
    cfg.train.lr, cfg.train.steps, cfg.methods.lr = 0.5, 300, dict(cfg.methods.lr, full=1.0)
    cfg.prompts.image, cfg.backbone.dtype, cfg.evaluate.ks = "", "bfloat16", [1]
    cfg.pretrain.out, cfg.pretrain.seed = "elsewhere", 7
    assert key() == base
    cfg.data.n_train = 10
    assert key() != base
    cfg.data.n_train, cfg.pretrain.mix = load_config(None).data.n_train, dict(cfg.pretrain.mix, facts=0.5)
    assert key() != base


def test_the_lm_choice_is_in_the_key_its_source_and_the_default_are_not(cfg):
    """A real LM is another recipe; where its wheel or GGUF lies is not; and the default tiny LM
    leaves the key as it was before pretrain.lm existed (finished seeds stay valid)."""
    base = study.recipe(cfg)
    assert "lm" not in base["pretrain"] and "gguf" not in base["pretrain"]
    key = study.recipe_key(base)
    cfg.pretrain.lm_source, cfg.pretrain.gguf = "/wheels", "elsewhere/lm.gguf"
    assert study.recipe_key(study.recipe(cfg)) == key
    cfg.pretrain.knowledge = "reports/lm_knowledge.json"  # where the probe report goes
    assert study.recipe_key(study.recipe(cfg)) == key
    cfg.pretrain.lm = "smollm2"
    assert study.recipe_key(study.recipe(cfg)) != key


@pytest.mark.parametrize("key,value", [("autocast", "bfloat16"), ("attn_implementation", "eager")])
def test_speed_settings_at_their_defaults_leave_the_key_and_otherwise_change_it(cfg, key, value):
    """bf16 autocast and another attention kernel change the arithmetic, so a seed run with them is
    another recipe; at their defaults (null) the key is the one made before they existed."""
    base = study.recipe(cfg)
    assert key not in base["pretrain"]
    setattr(cfg.pretrain, key, value)
    assert study.recipe(cfg)["pretrain"][key] == value
    assert study.recipe_key(study.recipe(cfg)) != study.recipe_key(base)


def test_crashed_seed_leaves_no_result_and_reruns(cfg, tmp_path):
    cfg._crash_seeds = (1,)
    s = study.run_study(cfg, range(3), "studies", jobs=1, **FAKE)
    assert list(s.failed) == [1] and "seed 1 crashed" in s.failed[1]
    assert s.ran == [0, 2] and [r["seed"] for r in s.results] == [0, 2]
    seed_dir = tmp_path / "studies" / s.key / "seed_1"
    assert not (seed_dir / study.RESULT).exists()
    assert not [p for p in (tmp_path / "studies").rglob("*") if p.name.endswith(".tmp")]  # no half-written file
    CALLS.clear()
    cfg._crash_seeds = ()
    again = study.run_study(cfg, range(3), "studies", jobs=1, **FAKE)
    assert pretrained_seeds() == [1] and not again.failed and len(again.results) == 3


def editing_step(cfg, job, step, on_event=None):
    """fake_step that also leaves a method's real finished mark (`scores/<method>.json`), and edits the
    (stand-in) code package while the step `cfg._edit_at` runs, as a developer saving a file would."""
    fake_step(cfg, job, step, on_event)
    if step != "pretrain":
        study.scores_path(job, step).parent.mkdir(parents=True, exist_ok=True)
        study.scores_path(job, step).write_text("{}")
    if (job.seed, step) == getattr(cfg, "_edit_at", None):
        (study.CODE_ROOT / "train.py").write_text("# edited while the study ran\n")


@pytest.mark.parametrize("step", ["pretrain", "lora"])
def test_code_edited_while_a_study_runs_fails_its_steps_and_keeps_no_mixed_result(cfg, tmp_path, monkeypatch,
                                                                                   step):
    code = tmp_path / "pkg"
    (code / "stages").mkdir(parents=True)
    (code / "train.py").write_text("x = 1\n")
    (code / "stages" / "train.py").write_text("y = 2\n")
    monkeypatch.setattr(study, "CODE_ROOT", code)
    cfg._edit_at = (0, step)
    s = study.run_study(cfg, range(2), "studies", jobs=1, step_runner=editing_step, collect=fake_collect,
                        progress=False)
    assert s.results == [] and sorted(s.failed) == [0, 1]
    assert "seed 0 " + step + ": slq's code changed since the study started (train.py under" in s.failed[0]
    assert "while the step ran; its output is not kept" in s.failed[0] and "git worktree" in s.failed[0]
    assert "seed 1 pretrain" in s.failed[1] and "before the step started" in s.failed[1]
    assert (0, "full") not in CALLS and (1, "pretrain") not in CALLS  # nothing ran after the edit
    seed0 = tmp_path / "studies" / s.key / "seed_0"
    bdir = tmp_path / "studies" / "backbones" / study.recipe_key(study.backbone_recipe(cfg)) / "seed_0"
    assert (bdir / study.PRETRAINED).is_file() == (step != "pretrain")  # the step's finished mark is gone
    assert not (seed0 / "scores" / f"{step}.json").exists()
    if step == "lora":
        assert (seed0 / "scores" / "slq.json").is_file()  # a step that ran before the edit is kept
    CALLS.clear()
    cfg._edit_at = None
    again = study.run_study(cfg, range(2), "studies", jobs=1, step_runner=editing_step, collect=fake_collect,
                            progress=False)  # the code as it is now, unchanged while it runs
    assert not again.failed and [r["seed"] for r in again.results] == [0, 1]
    assert ((0, "pretrain") in CALLS) == (step == "pretrain") and (0, "lora") in CALLS


def test_a_kill_while_writing_keeps_the_old_result(cfg, tmp_path, monkeypatch):
    study.run_study(cfg, [0], "studies", jobs=1, **FAKE)
    path = next((tmp_path / "studies").rglob(study.RESULT))
    before = path.read_text()
    import slq.io

    def dies(f, *a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(slq.io.os, "replace", dies)
    with pytest.raises(KeyboardInterrupt):
        bdir = next((tmp_path / "studies" / "backbones").glob("*/seed_0"))
        study.run_one(fake_collect, cfg, study.SeedJob(0, path.parent, list(BASE), list(SPLITS), backbone_dir=bdir),
                      {"pretrain": 1.0})
    assert path.read_text() == before and not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]


def test_a_resumed_seed_counts_the_time_its_earlier_runs_spent(cfg, tmp_path, monkeypatch):
    """The real step runner and collector, the heavy parts (pretraining, training, scoring) replaced
    by sleeps: a seed interrupted after its pretraining and SLQ's step is resumed by a second run;
    its result counts each step's own recorded time (the pretraining and SLQ from the first run),
    not the instant the second run took to find them done."""
    import time

    import slq.mlops.baselines
    import slq.mlops.training

    cfg.methods.compare = ["lora"]
    manifest = cfg.path(cfg.data.root) / cfg.data.manifest
    manifest.parent.mkdir(parents=True, exist_ok=True)
    manifest.write_text("{}\n")
    took = {"pretrain": 0.30, "slq": 0.20, "lora": 0.10}
    crash = {"lora"}

    def fake_pretrained(c):
        time.sleep(took["pretrain"])
        return {"loss_last10": 1.0, "fact_accuracy": 1.0, "wall_time_s": 99.0, "steps": 1, "params": 1,
                "reused": False}

    def fake_train(c, method, ckpt, **kw):
        if method in crash:
            raise RuntimeError("killed")
        time.sleep(took[method])
        return {"steps": 7, "wall_time_s": 1.0}

    monkeypatch.setattr(study, "pretrained", fake_pretrained)
    monkeypatch.setattr(slq.mlops.training, "train_method", fake_train)
    monkeypatch.setattr(slq.mlops.baselines, "evaluate_checkpoint",
                        lambda c, ckpt, splits: {s: {"t2i_R@1": 0.5, "i2t_R@1": 0.5} for s in splits})
    first = study.run_study(cfg, [0], "studies", jobs=1, progress=False)
    assert first.results == [] and first.failed[0].startswith("lora: RuntimeError")
    crash.clear()
    took.update(pretrain=5.0, slq=5.0)  # were they to run again, the test would see it
    t0 = time.perf_counter()
    second = study.run_study(cfg, [0], "studies", jobs=1, progress=False)
    assert time.perf_counter() - t0 < 3.0 and second.ran == [0]
    got = second.results[0]["step_s"]
    assert set(got) == {"pretrain", "slq", "lora"}
    assert 0.30 <= got["pretrain"] < 2.0 and 0.20 <= got["slq"] < 2.0 and 0.10 <= got["lora"] < 2.0
    assert second.results[0]["wall_s"] == pytest.approx(sum(got.values()))
    # another study on the same backbones (a new method recipe) did not pretrain: not its time
    cfg.methods.lr = dict(cfg.methods.lr, lora=0.5)
    took.update(slq=0.0)
    third = study.run_study(cfg, [0], "studies", jobs=1, progress=False)
    assert third.key != second.key and set(third.results[0]["step_s"]) == {"slq", "lora"}


def test_a_seed_without_a_newly_asked_method_reruns(cfg):
    study.run_study(cfg, range(2), "studies", methods=["slq", "lora"], jobs=1, **FAKE)
    CALLS.clear()
    s = study.run_study(cfg, range(2), "studies", jobs=1, **FAKE)
    assert pretrained_seeds() == [] and set(s.results[0]["scores"]) == set(BASE)  # on the same backbones


def test_seed_config_puts_everything_under_the_seed_folder(cfg, tmp_path):
    c = study.seed_config(cfg, 3, tmp_path / "s")
    assert c.pretrain.seed == 3 and c.backbone.builtin and c.backbone.path == c.pretrain.out
    for p in (c.pretrain.out, c.pretrain.metrics, c.pretrain.history, c.train.work_dir, c.methods.out,
              c.methods.metrics, c.evaluate.cache_dir):
        assert Path(p).is_relative_to(tmp_path / "s")
    assert not c.register.track_stages
    assert cfg.pretrain.seed == 0 and cfg.pretrain.out == "models/tiny-qwen3-vl"  # the study's config untouched
    c = study.seed_config(cfg, 3, tmp_path / "s", tmp_path / "b")  # the backbone kept apart: only its files there
    for p in (c.pretrain.out, c.pretrain.metrics, c.pretrain.history):
        assert Path(p).is_relative_to(tmp_path / "b")
    for p in (c.train.work_dir, c.methods.out, c.methods.metrics, c.evaluate.cache_dir):
        assert Path(p).is_relative_to(tmp_path / "s")
    assert c.backbone.path == c.pretrain.out


def test_a_real_lm_seed_probes_into_its_own_folder_and_its_everyday_split_reads_it(tmp_path):
    """pretrain.knowledge (the real LM's probe report) goes under the seed's folder, and the
    world_everyday entry that read the shared report reads the seed's; other entries are untouched."""
    cfg = load_config(None, {"pretrain.knowledge": "reports/smollm2/lm_knowledge.json"})
    cfg.evaluate.benchmarks = [{"name": "world", "split": "test"},
                               {"name": "world_everyday", "split": "test", "cues": "reports/smollm2/lm_knowledge.json"}]
    c = study.seed_config(cfg, 1, tmp_path / "s", tmp_path / "b")
    assert c.pretrain.knowledge == str((tmp_path / "b" / "lm_knowledge.json").resolve())  # beside its backbone
    assert c.evaluate.benchmarks == [{"name": "world", "split": "test"},
                                     {"name": "world_everyday", "split": "test", "cues": c.pretrain.knowledge}]
    assert cfg.evaluate.benchmarks[1]["cues"] == "reports/smollm2/lm_knowledge.json"  # the study's own config untouched


def test_the_study_scores_methods_benchmarks_unless_told(cfg):
    """By default every method is scored on `methods.benchmarks` (as the methods stage scores them);
    `splits` narrows it; a benchmark the methods cannot be scored on is refused before anything runs."""
    cfg.methods.benchmarks = ["world"]
    s = study.run_study(cfg, [0], "studies", jobs=1, **FAKE)
    assert s.splits == ["world"] and set(s.results[0]["scores"]["slq"]) == {"world"}
    assert study.aggregate(s.results, splits=s.splits)["splits"] == ["world"]
    s = study.run_study(cfg, [0], "studies", jobs=1, splits=list(SPLITS), **FAKE)
    assert set(s.results[0]["scores"]["slq"]) == set(SPLITS)  # the seed reran for the split it lacked
    CALLS.clear()
    with pytest.raises(ValueError, match="'coco' is not one of"):
        study.run_study(cfg, [1], "studies", jobs=1, splits=["coco"], **FAKE)
    assert CALLS == []


def test_jobs():
    cfg = load_config(None, {"backbone.device": "cpu"})
    from slq.mlops.baselines import cpu_count

    assert study.resolve_jobs(cfg, None, 10) == cpu_count()
    assert study.resolve_jobs(cfg, 4, 2) == 2 and study.resolve_jobs(cfg, 1, 5) == 1
    with pytest.raises(ValueError):
        study.resolve_jobs(cfg, 0, 3)


def test_side_by_side_in_processes(cfg, tmp_path):
    """Steps at once, each in a spawned process appending to its seed's log: every method after its
    seed's pretraining; a crash (in a pretraining or in one method) fails its own seed only."""
    cfg._crash_seeds = (2,)
    cfg._crash_steps = ((1, "lora"),)
    s = study.run_study(cfg, range(4), "studies", jobs=2, **FAKE)
    assert s.ran == [0, 3] and sorted(s.failed) == [1, 2]
    assert "log.txt" in s.failed[2] and s.failed[1].startswith("lora: ")
    assert [r["seed"] for r in s.results] == [0, 3]
    assert s.results[1]["scores"] == fake_scores(3)  # floats come back from JSON exactly
    logs = tmp_path / "studies" / s.key
    for seed in (0, 3):
        bdir = tmp_path / "studies" / "backbones" / study.recipe_key(study.backbone_recipe(cfg)) / f"seed_{seed}"
        done = {step: json.loads(((bdir if step == "pretrain" else logs / f"seed_{seed}") / f"fake_{step}.json")
                                 .read_text()) for step in ("pretrain", *BASE)}
        assert all(done[m]["start"] >= done["pretrain"]["end"] for m in BASE)
        assert set(s.results[[0, 3].index(seed)]["step_s"]) == {"pretrain", *BASE}
    log0 = (logs / "seed_0" / "log.txt").read_text()
    assert "seed 0 pretrain: 1 thread(s)" in log0 and "seed 0 lora: 1 thread(s)" in log0
    assert "seed 2 crashed" in (logs / "seed_2" / "log.txt").read_text()
    assert "seed 1 lora crashed" in (logs / "seed_1" / "log.txt").read_text()
    assert not (logs / "seed_2" / study.RESULT).exists() and not (logs / "seed_1" / study.RESULT).exists()
    assert next((tmp_path / "studies" / "backbones").glob("*/seed_1/fake_pretrain.json"))  # a failed seed
    assert not list((tmp_path / "studies" / "backbones").glob("*/seed_2/fake_pretrain.json"))  # keeps its finished steps


def _took(plan):
    t = plan.take()
    return t and (t[0].seed, t[1])


def test_the_plan_pretrains_first_with_several_jobs():
    """Several jobs: every ready pretraining before any method (the long steps first, so no core
    idles at the end), a seed's methods only after its pretraining, then by seed."""
    plan = study._Plan([study.SeedJob(s, Path(f"s{s}"), ["slq", "lora"], list(SPLITS)) for s in range(3)], True)
    assert [_took(plan), _took(plan)] == [(0, "pretrain"), (1, "pretrain")]
    assert not plan.done(1, "pretrain")  # seed 1 still has its methods
    assert _took(plan) == (2, "pretrain")  # a pretraining before seed 1's ready methods
    assert _took(plan) == (1, "slq") and _took(plan) == (1, "lora")
    assert _took(plan) is None  # seeds 0 and 2 are still pretraining
    plan.fail(2)
    assert plan.done(0, "pretrain") is False and _took(plan) == (0, "slq")
    assert not plan.done(1, "slq") and plan.done(1, "lora")  # seed 1: nothing left
    assert _took(plan) == (0, "lora") and _took(plan) is None  # seed 2 failed: none of its steps


def test_the_plan_goes_seed_by_seed_with_one_job():
    plan = study._Plan([study.SeedJob(s, Path(f"s{s}"), ["slq", "lora"], list(SPLITS)) for s in range(2)], False)
    order = []
    while (t := _took(plan)) is not None:
        order.append(t)
        plan.done(*t)
    assert order == [(0, "pretrain"), (0, "slq"), (0, "lora"), (1, "pretrain"), (1, "slq"), (1, "lora")]


# ---- the command ----------------------------------------------------------------------------

def test_cli_study_seeds(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    import cli

    monkeypatch.setattr(study, "run_step", fake_step)
    monkeypatch.setattr(study, "collect_seed", fake_collect)
    params = tmp_path / "params.yaml"
    params.write_text("train:\n  steps: 7\n")
    CALLS.clear()
    runner = CliRunner()
    out = ["--root", "st", "--report", "r/study.md", "--json-out", "m/study.json", "-p", str(params)]
    r = runner.invoke(cli.app, ["study", "seeds", "--n", "3", "--jobs", "1", *out])
    assert r.exit_code == 0, r.output
    assert pretrained_seeds() == [0, 1, 2]
    md = (tmp_path / "r" / "study.md").read_text()
    print(md)
    doc = json.loads((tmp_path / "m" / "study.json").read_text())
    assert doc["n"] == 3 and doc["seeds"] == [0, 1, 2] and doc["metrics"] == ["t2i_R@1", "i2t_R@1"]
    slq = row(doc, "summary", "slq")
    vals = [fake_scores(s)["slq"]["world"]["t2i_R@1"] for s in range(3)]
    assert slq["mean"] == pytest.approx(statistics.mean(vals)) and slq["sd"] == pytest.approx(statistics.stdev(vals))
    assert f"| slq | {slq['mean']:.3f} ± {slq['sd']:.3f}" in md and "| slq - full |" in md
    assert "## Backbones" in md and "ran 3 seed(s), reused 0" in md
    summed = sum(r["wall_s"] for r in doc["results"])
    assert doc["header"]["steps' time"].startswith(f"{summed:.0f} s, summed")
    assert "already pretrained" not in doc["header"]["backbones"]
    assert len(doc["results"]) == 3 and doc["recipe_key"] == doc["header"]["recipe key"].split()[0]
    assert (tmp_path / "st" / doc["recipe_key"] / "study.md").read_text() == md
    assert "Over 3 seeds" in r.output  # the rich table
    # more seeds: only the new ones run; --seeds as a list, a --set override is a new recipe
    CALLS.clear()
    r = runner.invoke(cli.app, ["study", "seeds", "--seeds", "0", "1", "2", "3", "--jobs", "1", *out])
    assert r.exit_code == 0, r.output
    assert pretrained_seeds() == [3] and json.loads((tmp_path / "m" / "study.json").read_text())["seeds"] == [0, 1, 2, 3]
    CALLS.clear()
    r = runner.invoke(cli.app, ["study", "seeds", "--n", "2", "--jobs", "1", "--set", "train.steps=9", "--json", *out])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["recipe_key"] != doc["recipe_key"]
    assert pretrained_seeds() == [] and {s for s, _ in CALLS} == {0, 1}  # its methods, on the same backbones
    head = json.loads(r.stdout)["header"]
    assert head["backbones"].endswith(", 2 already pretrained") and head["backbones"].split()[1].rstrip(",") == \
        doc["header"]["backbones"].split()[1]  # the same backbone key as the first study's
    # a user error is one line
    r = runner.invoke(cli.app, ["study", "seeds", "--n", "2", "--seeds", "1", *out])
    assert r.exit_code == 1 and "not both" in r.output
    r = runner.invoke(cli.app, ["study", "seeds", "--n", "2", "--method", "nope", *out])
    assert r.exit_code == 1 and "nope" in r.output
    r = runner.invoke(cli.app, ["study", "seeds", "--n", "2", "--split", "coco", *out])
    assert r.exit_code == 1 and "methods.benchmarks: 'coco' is not one of" in r.output
    # --split narrows the table to that benchmark
    r = runner.invoke(cli.app, ["study", "seeds", "--n", "2", "--split", "world", "--json", *out])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["splits"] == ["world"]
    # without --root/--report/--json-out: the params' study section says where (each pipeline its own)
    params.write_text("train:\n  steps: 7\nstudy:\n  root: st2\n  report: r2/s.md\n  metrics: m2/s.json\n")
    r = runner.invoke(cli.app, ["study", "seeds", "--n", "1", "--jobs", "1", "-p", str(params)])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "r2" / "s.md").is_file() and json.loads((tmp_path / "m2" / "s.json").read_text())["n"] == 1
    assert len(list((tmp_path / "st2").glob("*/seed_0/result.json"))) == 1


def test_a_study_resumes_from_what_git_keeps(cfg, tmp_path):
    """Finished seeds' results, their methods' scores and the recipe are versioned (the project's
    .gitignore), the backbones, checkpoints and caches are not: a fresh clone (later, or a
    teammate) reruns no finished seed."""
    import shutil
    import subprocess

    first = study.run_study(cfg, range(2), cfg.study.root, jobs=1, **FAKE)
    root = tmp_path / cfg.study.root  # the default root, studies/seeds
    seed0 = root / first.key / "seed_0"
    bulky = [seed0 / "checkpoints" / "slq" / "queries.safetensors", seed0 / "work" / "state.pt",
             seed0 / "embed_cache" / "x.npy", root / "backbones" / first.backbone_key / "seed_0"
             / "backbone" / "model.safetensors"]
    for p in [*bulky, seed0 / "scores" / "slq.json"]:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text("{}")
    shutil.copy(Path(__file__).resolve().parents[1] / ".gitignore", tmp_path / ".gitignore")
    git = lambda *a: subprocess.run(["git", *a], cwd=tmp_path, check=True, capture_output=True, text=True).stdout
    git("init", "-q")
    kept = {line[3:] for line in git("status", "--porcelain", "--untracked-files=all").splitlines()}
    at = f"{cfg.study.root}/{first.key}"
    want = {f"{at}/recipe.json", f"{at}/seed_0/scores/slq.json", *(f"{at}/seed_{s}/{study.RESULT}" for s in range(2))}
    assert {k for k in kept if k.startswith("studies/")} == want
    git("clean", "-fdqX")  # what a fresh clone has: only what git keeps
    assert not any(p.exists() for p in bulky) and not (root / "backbones").exists()
    CALLS.clear()
    again = study.run_study(cfg, range(3), cfg.study.root, jobs=1, **FAKE)
    assert again.cached == [0, 1] and again.ran == [2] and pretrained_seeds() == [2]
    assert [r["scores"] for r in again.results[:2]] == [r["scores"] for r in first.results]
