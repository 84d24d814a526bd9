"""The pipeline end to end, with the real tools in a temporary project: DVC, the CLI, the
Prefect flow (test harness), MLflow (sqlite) and LanceDB, on a reduced synthetic world."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
BANKS = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]["bank_train"]["foreach"]  # the bank set
SMALL = {
    "data": {"n_train": 48, "n_val": 8, "n_test": 24, "image_size": 64},
    "train": {"steps": 6, "batch_size": 8, "save_every": 3, "warmup_steps": 2, "num_queries": 4},
    "embed": {"batch_size": 16},
    "methods": {"workers": 2},  # side by side in worker processes, whatever the machine's cores
    "pretrain": {"hidden_size": 32, "num_layers": 2, "vision_dim": 32, "vocab_size": 600, "image_pixels": 96,
                 "n_scenes": 100, "steps": 6, "batch_size": 8, "warmup_steps": 2},
}


def make_project(dest: Path) -> Path:
    """A copy of the project's pipeline files with a reduced params.yaml, and the real-LM pipeline's
    DVC project (pipelines/smollm2, as git holds it) beside them, as in the project: no test runs
    it, and the default's plain dvc commands must not reach it."""
    dest.mkdir(parents=True, exist_ok=True)
    second = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "pipelines"],
                            cwd=REPO, capture_output=True, text=True, check=True).stdout.split()  # its files, no output
    assert "pipelines/smollm2/.dvc/config" in second
    banks = [p.relative_to(REPO).as_posix() for p in sorted((REPO / "params" / "banks").glob("*.yaml"))]
    for name in ("cli.py", "dvc.yaml", ".dvcignore", "docs/results.md", *second, *banks):  # .dvcignore: bytecode is no code dep
        (dest / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / name, dest / name)
    for pkg in ("slq", "flows"):
        shutil.copytree(REPO / pkg, dest / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    for section, values in SMALL.items():
        params[section].update(values)
    (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return dest


def sh(*args, cwd, check=True):
    env = {**os.environ, "PYTHONPATH": str(cwd)}
    res = subprocess.run(list(args), cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    if check and res.returncode != 0:
        raise AssertionError(f"{args} failed ({res.returncode}):\n{res.stdout[-4000:]}\n{res.stderr[-4000:]}")
    return res


def dvc(*args, cwd, check=True):
    return sh(sys.executable, "-m", "dvc", *args, cwd=cwd, check=check)


@pytest.fixture(scope="module")
def repro(tmp_path_factory):
    """A reduced project after one full `dvc repro`."""
    proj = make_project(tmp_path_factory.mktemp("proj"))
    dvc("init", "--no-scm", "-q", cwd=proj)
    sh(sys.executable, "cli.py", "data", "generate", cwd=proj)
    dvc("add", "data/world", cwd=proj)  # pinned, as the project's data.dvc pins data/world
    first = dvc("repro", cwd=proj)
    return proj, first.stdout


def test_dvc_repro_runs_every_stage(repro):
    proj, out = repro
    for stage in ("validate", "pretrain", "train", "embed", "index", "evaluate", "methods", "compare", "register"):
        assert f"Running stage '{stage}'" in out
    for bank in BANKS:  # the bank set: a foreach stage per step, each bank its own checkpoint and alias
        for stage in ("train", "embed", "index", "evaluate", "register"):
            assert f"Running stage 'bank_{stage}@{bank}'" in out
    assert json.loads((proj / "reports/validate.json").read_text())["success"] is True
    pre = json.loads((proj / "metrics/pretrain.json").read_text())
    assert pre["steps"] == 6 and pre["sample"]["generated"] is not None and 0 <= pre["fact_accuracy"] <= 1
    assert (proj / "models/tiny-qwen3-vl/model.safetensors").exists()
    assert (proj / "checkpoints/slq/queries.safetensors").exists()
    metrics = json.loads((proj / "metrics/eval.json").read_text())
    assert {"t2i_R@1", "i2t_R@10", "n_images"} <= set(metrics) and metrics["n_images"] == 24
    index = json.loads((proj / "artifacts/index.json").read_text())
    assert index["slq_test_text"]["rows"] == 48
    reg = json.loads((proj / "reports/register.json").read_text())
    assert reg["promoted"] is True and reg["alias"] == "champion"
    versions = {reg["version"]}
    for bank in BANKS:  # every bank: its own version, promoted under its own alias, on the same backbone
        breg = json.loads((proj / f"reports/banks/{bank}/register.json").read_text())
        assert breg["promoted"] is True and breg["alias"] == f"bank-{bank}", breg
        assert breg["checkpoint_hash"] != reg["checkpoint_hash"]
        versions.add(breg["version"])
        beval = json.loads((proj / f"metrics/banks/{bank}/eval.json").read_text())
        assert beval["checkpoint_hash"] == breg["checkpoint_hash"]
        bman = json.loads((proj / f"checkpoints/banks/{bank}/slq.json").read_text())
        dman = json.loads((proj / "checkpoints/slq/slq.json").read_text())
        assert bman["backbone"] == dman["backbone"]  # the same backbone, fingerprint and all
    assert len(versions) == 1 + len(BANKS)
    assert set(metrics["benchmarks"]) == {"world", "world_composed", "world_knowledge"}
    assert metrics["benchmarks"]["world"]["t2i_R@1"] == metrics["t2i_R@1"]  # two paths, one number
    assert metrics["modality_gap"]["trained"] > 0
    report = (proj / "reports/benchmarks/benchmarks.md").read_text()
    reused = re.search(r"(\d+) from the embed stage", report)
    assert reused and int(reused.group(1)) >= 2  # the world test split is not embedded a second time
    assert "| world_knowledge | t2i_R@1 |" in report and "Checkpoint hash" in report
    assert (proj / "reports/benchmarks/pca_trained.png").read_bytes()[:4] == b"\x89PNG"


def test_methods_are_compared_in_the_report_the_readme_and_mlflow(repro):
    from mlflow import MlflowClient

    proj, _ = repro
    table = (proj / "reports/methods.md").read_text()
    for m in ("slq", "zero_shot", "lora", "full"):
        assert f"| {m} |" in table
    assert "world_knowledge t2i R@1" in table and "trainable params" in table
    results = (proj / "docs/results.md").read_text()
    assert results == (REPO / "docs/results.md").read_text()  # the pipeline writes no tracked file
    sh(sys.executable, "cli.py", "readme", cwd=proj)  # `slq readme` copies the table in, stamped
    results = (proj / "docs/results.md").read_text()
    assert table.split("# Methods compared\n\n", 1)[1] in results and "Copied by `slq readme`" in results
    cmp = json.loads((proj / "metrics/compare.json").read_text())
    assert cmp["zero_shot"]["budget"]["trainable_params"] == 0
    assert 0 < cmp["slq"]["budget"]["trainable_params"] < cmp["lora"]["budget"]["trainable_params"]
    assert cmp["lora"]["budget"]["trainable_params"] < cmp["full"]["budget"]["trainable_params"]
    scored = json.loads((proj / "metrics/eval.json").read_text())["benchmarks"]
    assert {b: cmp["slq"][b] for b in ("world", "world_knowledge")} == {b: scored[b] for b in ("world", "world_knowledge")}
    client = MlflowClient(f"sqlite:///{proj / 'mlflow.db'}")
    exp = client.get_experiment_by_name("slq")
    runs = [r for r in client.search_runs([exp.experiment_id], "tags.stage = 'methods'") if "method" in r.data.tags]
    assert sorted(r.data.tags["method"] for r in runs) == ["full", "lora", "zero_shot"]
    lora = next(r for r in runs if r.data.tags["method"] == "lora")
    assert "world_knowledge.t2i_R_at_1" in lora.data.metrics and "budget.step_time_mean" in lora.data.metrics
    # the SLQ run carries the same benchmark metrics under the same names, and its loss curve by step
    slq_run = client.search_runs([exp.experiment_id], "tags.method = 'slq'", order_by=["attributes.start_time DESC"])[0]
    for name in ("world.t2i_R_at_1", "world_knowledge.t2i_R_at_1"):
        assert name in slq_run.data.metrics and name in lora.data.metrics
    assert slq_run.data.metrics["world.t2i_R_at_1"] == pytest.approx(scored["world"]["t2i_R@1"])
    curve = client.get_metric_history(slq_run.info.run_id, "train.loss")
    steps = json.loads((proj / "metrics/train.json").read_text())["steps"]
    assert [m.step for m in curve] == list(range(1, steps + 1))


def test_methods_ran_side_by_side_and_match_a_run_in_one_process(repro):
    from safetensors.torch import load_file

    proj, out = repro
    assert "on 2 worker processes" in out
    for m in ("zero_shot", "lora", "full"):
        log = (proj / f"logs/methods/{m}.log").read_text()
        assert f"method {m}:" in log and '"benchmarks"' in log  # the worker's own output, kept
    # the same method in this process (default threads) trains the same weights
    sh(sys.executable, "cli.py", "stage", "methods", "--method", "lora", "--set", "methods.out=checkpoints/seq",
       "--set", "methods.metrics=metrics/seq", cwd=proj)
    side = load_file(str(proj / "checkpoints/methods/lora/llm.safetensors"))
    alone = load_file(str(proj / "checkpoints/seq/lora/llm.safetensors"))
    assert side.keys() == alone.keys() and side
    for k in side:
        assert torch.allclose(side[k], alone[k], rtol=1e-4, atol=1e-6), k
    a = json.loads((proj / "metrics/methods/lora.json").read_text())
    b = json.loads((proj / "metrics/seq/lora.json").read_text())
    assert a["budget"]["trainable_params"] == b["budget"]["trainable_params"]
    assert a["budget"]["final_loss"] == pytest.approx(b["budget"]["final_loss"], rel=1e-4)


def test_a_failing_method_is_named_and_the_others_are_kept(repro):
    proj, _ = repro
    res = sh(sys.executable, "cli.py", "stage", "methods", "--set", "methods.out=checkpoints/bad",
             "--set", "methods.metrics=metrics/bad", "--set", "methods.pooling.full=bogus", cwd=proj, check=False)
    assert res.returncode != 0
    err = res.stdout + res.stderr
    assert "full: MethodError" in err and "bogus" in err and "logs/methods/full.log" in err
    assert "kept: " in err and "lora" in err
    assert {p.name for p in (proj / "metrics/bad").glob("*.json")} == {"lora.json", "zero_shot.json"}
    assert "bogus" in (proj / "logs/methods/full.log").read_text()  # the traceback is in the log


def test_a_fresh_clone_with_the_backbone_cached_skips_pretraining(repro, tmp_path):
    """What `git clone` + `dvc pull pretrain` gives: the backbone's stage is up to date, only the
    cheap validation reruns (its report is regenerated, byte for byte) before the stages below it."""
    proj, _ = repro
    clone = make_project(tmp_path / "clone")  # the same files, none of the outputs
    shutil.copy(proj / "dvc.lock", clone / "dvc.lock")
    dvc("init", "--no-scm", "-q", cwd=clone)
    dvc("cache", "dir", str(proj / ".dvc" / "cache"), cwd=clone)
    sh(sys.executable, "cli.py", "data", "generate", cwd=clone)
    dvc("checkout", "pretrain", cwd=clone)
    assert (clone / "models/tiny-qwen3-vl/model.safetensors").is_file()
    assert (clone / "metrics/pretrain.json").read_text() == (proj / "metrics/pretrain.json").read_text()
    assert "pretrain:" in dvc("status", "pretrain", cwd=clone).stdout  # its validation report is not there yet
    dvc("repro", "-s", "validate", cwd=clone)
    assert "pretrain:" not in dvc("status", "pretrain", cwd=clone).stdout


def test_rescoring_with_other_ks_does_not_re_embed(repro):
    proj, _ = repro
    cache = proj / "artifacts/embed_cache"
    before = sorted(p.name for p in cache.glob("*.npy"))
    assert before
    sh(sys.executable, "cli.py", "stage", "evaluate", "--set", "evaluate.ks=[1,2,3]",
       "--set", "evaluate.modality_gap=false", "--set", "evaluate.metrics=metrics/eval_k123.json",
       "--set", "evaluate.plots=metrics/k123.csv", "--set", "evaluate.report_dir=reports/k123", cwd=proj)
    assert sorted(p.name for p in cache.glob("*.npy")) == before
    assert "t2i_R@2" in json.loads((proj / "metrics/eval_k123.json").read_text())["benchmarks"]["world"]
    # the modality gap's untrained-queries embeddings come from the cache too
    sh(sys.executable, "cli.py", "stage", "evaluate", "--set", "evaluate.metrics=metrics/eval_again.json",
       "--set", "evaluate.plots=metrics/again.csv", "--set", "evaluate.report_dir=reports/again", cwd=proj)
    assert sorted(p.name for p in cache.glob("*.npy")) == before
    again = json.loads((proj / "metrics/eval_again.json").read_text())["modality_gap"]
    assert again == json.loads((proj / "metrics/eval.json").read_text())["modality_gap"]
    assert "untrained_embeddings: 2 corpora embedded, 0 from the cache" in (
        proj / "reports/benchmarks/benchmarks.md").read_text()  # the pipeline's run: both embedded
    assert "untrained_embeddings: 0 corpora embedded, 2 from the cache" in (
        proj / "reports/again/benchmarks.md").read_text()


def test_dvc_metrics_and_plots_show(repro):
    proj, _ = repro
    shown = dvc("metrics", "show", cwd=proj).stdout
    assert "t2i_R@1" in shown and "final_loss" in shown
    dvc("plots", "show", "-o", "plots_html", cwd=proj)
    html = (proj / "plots_html" / "index.html").read_text()
    assert "recall_at_k.csv" in html and "reports/benchmarks/curves/world_composed.csv" in html


def test_second_repro_does_nothing_and_param_change_reruns_from_train(repro):
    proj, _ = repro
    again = dvc("repro", cwd=proj).stdout
    assert "Running stage" not in again
    first = json.loads((proj / "reports/register.json").read_text())["version"]
    params = yaml.safe_load((proj / "params.yaml").read_text())
    params["train"]["lr"] = params["train"]["builtin"]["lr"] / 2  # SLQ's own lr, set over the built-in backbone's
    (proj / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    out = dvc("repro", cwd=proj).stdout
    assert "Running stage 'validate'" not in out
    assert "Running stage 'pretrain'" not in out  # the backbone is cached
    for stage in ("train", "embed", "index", "evaluate", "compare", "register"):
        assert f"Running stage '{stage}'" in out
    assert "Running stage 'methods'" not in out  # SLQ's learning rate is not the baselines' budget
    reg = json.loads((proj / "reports/register.json").read_text())
    assert reg["version"] > first  # a new registered version; promoted only if it beat the champion
    assert isinstance(reg["promoted"], bool) and reg["reason"]
    # retuning a baseline marks the methods stage (and the table) as changed, not SLQ's stages
    params["methods"]["lr"]["full"] = params["methods"]["lr"]["full"] * 2
    (proj / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    status = dvc("status", cwd=proj).stdout
    assert "methods:" in status and "compare:" in status
    assert "train:" not in status and "evaluate:" not in status
    params["methods"]["lr"]["full"] = params["methods"]["lr"]["full"] / 2  # back as it was run
    (proj / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    assert "methods:" not in dvc("status", cwd=proj).stdout


def test_cli_search_metrics_runs(repro):
    from typer.testing import CliRunner

    import cli

    proj, _ = repro
    rows = [json.loads(x) for x in (proj / "data/world/manifest.jsonl").read_text().splitlines()]
    caption = next(r["caption"] for r in rows if r["split"] == "test")
    runner = CliRunner(env={"COLUMNS": "200"})
    cwd = os.getcwd()
    os.chdir(proj)
    try:
        res = runner.invoke(cli.app, ["search", caption, "--target", "text", "--k", "3"])
        assert res.exit_code == 0, res.output
        first = res.output.split(caption[:20])[0]
        assert "1.0000" in first or "0.9999" in first  # the caption itself is the top hit
        res = runner.invoke(cli.app, ["search", "--image", str(proj / "data/world" / rows[-1]["image"])])
        assert res.exit_code == 0, res.output
        assert "slq_test_text" in res.output
        res = runner.invoke(cli.app, ["metrics"])
        assert res.exit_code == 0 and "t2i_R@1" in res.output
        res = runner.invoke(cli.app, ["runs", "list"])
        assert res.exit_code == 0 and "FINISHED" in res.output
        res = runner.invoke(cli.app, ["search", "--image", "nope.png"])
        assert res.exit_code == 1 and "not found" in res.output
        res = runner.invoke(cli.app, ["stage", "nonsense"])
        assert res.exit_code == 1 and "unknown stage" in res.output
    finally:
        os.chdir(cwd)


def test_validation_failure_stops_dvc_and_keeps_outputs(repro):
    proj, _ = repro
    manifest = proj / "data/world/manifest.jsonl"
    original = manifest.read_text()
    keep = {p: (proj / p).read_bytes() for p in ("reports/validate.json", "metrics/eval.json",
                                                 "checkpoints/slq/queries.safetensors")}
    rows = [json.loads(x) for x in original.splitlines()]
    train = next(r for r in rows if r["split"] == "train")
    leaked = dict(next(r for r in rows if r["split"] == "test"), image=train["image"], image_id=train["image_id"])
    bad = rows + [dict(rows[0]), leaked]  # a duplicate id and a train image leaked into test
    pin = (proj / "data/world.dvc").read_text()
    manifest.write_text("".join(json.dumps(r) + "\n" for r in bad))
    try:
        res = dvc("repro", cwd=proj, check=False)
        assert res.returncode != 0
        text = res.stdout + res.stderr
        assert "validation failed" in text and "unique" in text and "leak" in text
        for p, content in keep.items():
            assert (proj / p).read_bytes() == content, f"{p} was touched"
        # dvc repro re-pinned the bad data before validate ran; the failed validation put the pin back
        assert (proj / "data/world.dvc").read_text() == pin
        assert "world.dvc restored to the last validated data" in text
    finally:
        manifest.write_text(original)


def test_prefect_flow_runs_the_same_stages(tmp_path, prefect_harness):
    """The flow in a DVC project: every stage runs once and is recorded in dvc.lock, so `dvc status`
    is clean and a second flow run skips every stage; MLflow holds one parent run with a nested
    run per stage and method, and the loss curves by step."""
    from mlflow import MlflowClient
    from prefect.client.orchestration import get_client

    from flows.pipeline import slq_pipeline

    proj = make_project(tmp_path / "flowproj")
    dvc("init", "--no-scm", "-q", cwd=proj)
    sh(sys.executable, "cli.py", "data", "generate", cwd=proj)
    results = slq_pipeline(params=str(proj / "params.yaml"))
    assert list(results) == ["validate", "pretrain", "train", "embed", "index", "evaluate", "methods", "compare"] + [
        f"bank_{stage}@{bank}" for bank in BANKS for stage in ("train", "embed", "index", "evaluate", "register")] + [
        "register"]  # the default's register last: it closes the pipeline's MLflow run
    assert not any(r.get("skipped") for r in results.values())
    assert (proj / "metrics/eval.json").exists() and results["register"]["promoted"] is True
    for bank in BANKS:  # the bank set, as dvc.yaml's foreach stages run it
        assert results[f"bank_register@{bank}"]["alias"] == f"bank-{bank}"
        assert results[f"bank_register@{bank}"]["promoted"] is True
    assert set(results["methods"]) == {"zero_shot", "lora", "full"}
    assert "up to date" in dvc("status", cwd=proj).stdout  # every stage recorded as dvc repro would
    assert "didn't change, skipping" in dvc("repro", "register", cwd=proj).stdout
    again = slq_pipeline(params=str(proj / "params.yaml"))
    assert all(r.get("skipped") for r in again.values()), {k: r.get("skipped") for k, r in again.items()}
    assert again["evaluate"]["t2i_R@1"] == results["evaluate"]["t2i_R@1"]  # read back from its metrics

    client = MlflowClient(f"sqlite:///{proj / 'mlflow.db'}")
    exp = client.get_experiment_by_name("slq")
    parents = client.search_runs([exp.experiment_id], "tags.`slq.role` = 'pipeline'")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"  # the skipped rerun logged nothing
    children = client.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{parents[0].info.run_id}'")
    # one nested run per stage (a bank's stage runs are named as the stage, the bank in the params)
    assert sorted(r.info.run_name for r in children) == sorted(n.split("@")[0].removeprefix("bank_") for n in results)
    methods_run = next(r for r in children if r.info.run_name == "methods")
    method_runs = client.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{methods_run.info.run_id}'")
    assert sorted(r.data.tags["method"] for r in method_runs) == ["full", "lora", "zero_shot"]
    steps = SMALL["train"]["steps"]
    train_run = next(r for r in children if r.info.run_name == "train")
    for run_id in (train_run.info.run_id, next(r for r in method_runs if r.data.tags["method"] == "lora").info.run_id):
        curve = client.get_metric_history(run_id, "train.loss")  # logged while training ran
        assert [m.step for m in curve] == list(range(1, steps + 1))

    import asyncio

    async def read_artifact(key="slq-metrics"):
        async with get_client() as client:
            from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

            return await client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])))

    arts = asyncio.run(read_artifact())
    assert arts and "t2i_R@1" in str(arts[0].data)
    assert "world_knowledge.t2i_R@1" in str(asyncio.run(read_artifact("slq-methods"))[0].data)


def test_the_bank_set_is_one_list(tmp_path):
    """The flow reads the bank set from dvc.yaml's bank_* stages, and refuses lists that disagree."""
    from flows.pipeline import BANK_STAGES, bank_set

    assert bank_set(REPO) == BANKS and len(BANKS) >= 2
    assert all((REPO / "params" / "banks" / f"{b}.yaml").is_file() for b in BANKS)
    doc = yaml.safe_load((REPO / "dvc.yaml").read_text())
    doc["stages"]["bank_index"]["foreach"] = BANKS[:1]
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump(doc))
    with pytest.raises(ValueError, match="must all be there with the same foreach list"):
        bank_set(tmp_path)
    assert bank_set(tmp_path / "nowhere") == [] and BANK_STAGES[-1] == "register"


def test_scheduled_deployment_registers_with_its_cron(prefect_harness):
    import asyncio

    from prefect.client.orchestration import get_client

    from flows.pipeline import deployment

    dep_id = deployment(name="slq-test", cron="0 3 * * *", params="params.yaml").apply()

    async def read():
        async with get_client() as client:
            return await client.read_deployment(dep_id)

    dep = asyncio.run(read())
    assert dep.name == "slq-test" and dep.parameters == {"params": "params.yaml"}
    assert [s.schedule.cron for s in dep.schedules] == ["0 3 * * *"]


def test_regenerated_world_matches_data_dvc(tmp_path):
    """`slq data generate` rebuilds exactly the bytes data.dvc pins, so the pin stays clean."""
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    shutil.copy(REPO / "cli.py", tmp_path / "cli.py")
    shutil.copytree(REPO / "slq", tmp_path / "slq", ignore=shutil.ignore_patterns("__pycache__"))
    dvc("init", "--no-scm", "-q", cwd=tmp_path)
    sh(sys.executable, "cli.py", "data", "generate", cwd=tmp_path)
    dvc("add", "data/world", cwd=tmp_path)  # hashes the regenerated folder
    pinned = yaml.safe_load((REPO / "data.dvc").read_text())["outs"][0]
    fresh = yaml.safe_load((tmp_path / "data/world.dvc").read_text())["outs"][0]
    assert (fresh["md5"], fresh["nfiles"], fresh["size"]) == (pinned["md5"], pinned["nfiles"], pinned["size"])


def test_cli_evaluates_a_checkpoint_on_a_real_format(repro, tmp_path):
    """`slq evaluate -b coco=ROOT` on a tiny copy of the Karpathy COCO layout, paper value beside ours."""
    from test_bench_image_text import karpathy_coco
    from typer.testing import CliRunner

    import cli

    proj, _ = repro
    coco = karpathy_coco(tmp_path / "coco")
    runner = CliRunner(env={"COLUMNS": "200"})
    cwd = os.getcwd()
    os.chdir(proj)
    try:
        res = runner.invoke(cli.app, ["evaluate", "--checkpoint", "checkpoints/slq", "-b", f"coco={coco}",
                                      "--set", "evaluate.report_dir=reports/coco_eval"])
        assert res.exit_code == 0, res.output
        report = (proj / "reports/coco_eval/benchmarks.md").read_text()
        assert "| coco | t2i_R@1 |" in report and "55.4" in report  # the paper's COCO t2i R@1
        res = runner.invoke(cli.app, ["evaluate", "-b", f"flickr30k={tmp_path / 'nowhere'}",
                                      "--set", "evaluate.report_dir=reports/coco_eval"])
        assert res.exit_code == 1 and "dataset_flickr30k.json" in res.output
    finally:
        os.chdir(cwd)


def test_a_teammate_pulls_the_results_from_the_s3_remote_and_reruns_nothing(repro, tmp_path, s3_endpoint,
                                                                            monkeypatch):
    """The team's road, with the real-LM pipeline's DVC project (pipelines/smollm2) in the tree and
    never run: commit + `dvc push` to the S3 remote (moto on 127.0.0.1) exits 0 without a warning;
    a fresh `git clone` + `dvc pull` exits 0, plain `dvc status` is clean, `dvc repro` reruns
    nothing and `dvc checkout` exits 0; an experiment's metrics show beside main's."""
    import boto3

    proj, _ = repro
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)  # how the project's remote finds a non-AWS S3
    for k, v in {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
                 "GIT_COMMITTER_EMAIL": "t@t"}.items():
        monkeypatch.setenv(k, v)
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket="slq-team")
    origin = tmp_path / "origin"
    shutil.copytree(proj, origin, symlinks=True)
    shutil.copy(REPO / ".gitignore", origin / ".gitignore")
    shutil.copy(REPO / ".dvc/.gitignore", origin / ".dvc/.gitignore")  # (dvc init --no-scm writes none)
    dvc("config", "core.no_scm", "false", cwd=origin)
    dvc("remote", "add", "-d", "team", "s3://slq-team/dvc", cwd=origin)
    sh("git", "init", "-q", "-b", "main", cwd=origin)
    sh("git", "add", "-A", cwd=origin)
    tracked = sh("git", "ls-files", cwd=origin).stdout.split()
    assert "metrics/eval.json" in tracked and "dvc.lock" in tracked and "data/world.dvc" in tracked
    assert "pipelines/smollm2/dvc.lock" in tracked and "pipelines/smollm2/metrics/compare.json" in tracked
    assert not [f for f in tracked if f.startswith(("models/", "checkpoints/", "artifacts/", ".dvc/cache"))]
    sh("git", "commit", "-q", "-m", "results", cwd=origin)
    assert "Data and pipelines are up to date" in dvc("status", cwd=origin).stdout  # the default's, alone
    pushed = dvc("push", cwd=origin)  # exits 0 (check)
    assert "WARNING" not in pushed.stdout + pushed.stderr, pushed.stdout + pushed.stderr

    clone = tmp_path / "clone"
    sh("git", "clone", "-q", str(origin), str(clone), cwd=tmp_path)
    pulled = dvc("pull", cwd=clone)
    assert "WARNING" not in pulled.stdout + pulled.stderr, pulled.stdout + pulled.stderr
    assert "Data and pipelines are up to date" in dvc("status", cwd=clone).stdout
    again = dvc("repro", cwd=clone).stdout
    assert "Running stage" not in again, again
    checkout = dvc("checkout", cwd=clone)
    assert "WARNING" not in checkout.stdout + checkout.stderr, checkout.stdout + checkout.stderr
    assert not sh("git", "status", "--porcelain", cwd=clone).stdout  # nothing the road wrote is left untracked
    # the real-LM pipeline is there, in its own DVC project: its stages, none of them run
    assert dvc("stage", "list", cwd=clone / "pipelines/smollm2").stdout.split()[0] == "gguf"

    train = yaml.safe_load((clone / "params.yaml").read_text())["train"]
    lr = train.get("lr", train["builtin"]["lr"])  # (an earlier test may have set it over the built-in backbone's)
    key = "train.lr" if "lr" in train else "+train.lr"  # `+`: a key params.yaml does not list yet
    dvc("exp", "run", "-n", "lr005", "-S", f"{key}={lr * 3}", cwd=clone)
    shown = json.loads(dvc("exp", "show", "--json", cwd=clone).stdout)
    main = next(e for e in shown if e.get("name") == "main")
    exp = next(r for x in main["experiments"] for r in x["revs"] if r["name"] == "lr005")
    for entry in (main, exp):  # both carry their metrics (not "!")
        assert isinstance(entry["data"]["metrics"]["metrics/eval.json"]["data"]["t2i_R@1"], float), entry
    assert exp["data"]["params"]["params.yaml"]["data"]["train"]["lr"] == pytest.approx(lr * 3)
    main_train = main["data"]["params"]["params.yaml"]["data"]["train"]
    assert main_train.get("lr", main_train["builtin"]["lr"]) == pytest.approx(lr)
    diff = dvc("metrics", "diff", "main", cwd=clone).stdout  # the workspace holds the experiment's results
    assert "metrics/eval.json" in diff
