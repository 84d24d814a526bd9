"""The real-LM pipeline's configuration (pipelines/smollm2): a params overlay on params.yaml whose
outputs never collide with the default pipeline's, read by the same stage code, and a dvc.yaml in
a DVC project of its own (pipelines/smollm2/.dvc), which shares the project's cache and remote and
which the project folder's plain dvc commands skip. (Running it needs PyPI and ~40 min:
docs/methods.md.)"""

import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import yaml

from slq.mlops.config import load_config

REPO = Path(__file__).resolve().parents[1]
PIPE = REPO / "pipelines" / "smollm2"


def _paths(cfg) -> dict:
    """Every configured output path of the stages the real-LM pipeline runs, resolved."""
    d = asdict(cfg)
    keys = {"pretrain": ("out", "metrics", "history", "knowledge"), "train": ("out", "work_dir", "metrics", "history"),
            "embed": ("out",), "evaluate": ("metrics", "plots", "report_dir", "cache_dir"),
            "index": ("uri", "out", "metrics"), "methods": ("out", "metrics", "report", "summary", "html"), "register": ("out",),
            "study": ("root", "report", "metrics")}
    return {f"{s}.{k}": cfg.path(d[s][k]) for s, ks in keys.items() for k in ks if d[s][k]}


def test_the_real_lm_params_are_an_overlay_apart_from_the_default():
    default, smol = load_config(REPO / "params.yaml"), load_config(PIPE / "params.yaml")
    assert Path(smol.root).resolve() == Path.cwd().resolve()  # `root: .`: run from the project folder (cd ../..)
    raw = yaml.safe_load((PIPE / "params.yaml").read_text())
    assert (PIPE / raw["extends"]).resolve() == REPO / "params.yaml"  # only what differs from the default
    assert set(raw) - {"root", "extends"} <= set(yaml.safe_load((REPO / "params.yaml").read_text()))
    mine, theirs = _paths(smol), _paths(load_config(REPO / "params.yaml"))
    assert not set(mine.values()) & set(theirs.values()), sorted(set(mine.values()) & set(theirs.values()))
    assert smol.data == default.data and smol.pretrain.lm == "smollm2"
    assert smol.backbone.path == smol.pretrain.out and smol.backbone.builtin
    assert set(smol.pretrain.mix) == {"caption", "qa_image"}  # the LM is frozen: only tasks with an image
    everyday = [b for b in smol.evaluate.benchmarks if b["name"] == "world_everyday"]
    assert everyday and everyday[0]["cues"] == smol.pretrain.knowledge
    # DVC keeps a project's outputs inside it: every output of the pipeline's stages is under pipelines/smollm2
    pipeline_outs = {k: v for k, v in mine.items() if not k.startswith("study.")}
    pipeline_outs["pretrain.gguf"] = smol.path(smol.pretrain.gguf)
    assert all(PIPE in p.parents for p in pipeline_outs.values()), pipeline_outs


def dvc(*args, cwd):
    return subprocess.run([sys.executable, "-m", "dvc", *args], cwd=cwd, capture_output=True, text=True, check=False)


def test_its_own_dvc_project_and_plain_dvc_stays_the_default():
    """`dvc stage list` in pipelines/smollm2 accepts its dvc.yaml; every stage runs in the project
    folder on the real-LM params and writes only inside pipelines/smollm2 (DVC keeps outputs inside
    their project); the project folder's plain dvc commands see none of its stages, and the two
    projects share one cache and one remote."""
    out = dvc("stage", "list", cwd=PIPE)
    assert out.returncode == 0, out.stderr
    names = [line.split()[0] for line in out.stdout.splitlines() if line.strip()]
    assert names == ["gguf", "pretrain", "train", "embed", "evaluate", "methods", "compare"]
    stages = yaml.safe_load((PIPE / "dvc.yaml").read_text())["stages"]
    for name, st in stages.items():
        assert "wdir" not in st  # DVC refuses a working folder outside the project
        assert name == "gguf" or st["cmd"] == f"cd ../.. && python cli.py stage {name} -p pipelines/smollm2/params.yaml"
        for kind in ("outs", "metrics", "plots"):
            for o in st.get(kind, []):
                path = (PIPE / (o if isinstance(o, str) else next(iter(o)))).resolve()
                assert PIPE in path.parents, (name, path)
    root = dvc("stage", "list", "--all", cwd=REPO)
    assert root.returncode == 0, root.stderr
    assert "smollm2" not in root.stdout and "\nregister" in "\n" + root.stdout  # the default's, and only them
    assert "smollm2" not in (REPO / "dvc.yaml").read_text()
    mine, theirs = (dict(line.split("=", 1) for line in dvc("config", "--project", "--list", cwd=d).stdout.split())
                    for d in (PIPE, REPO))
    assert Path(mine["cache.dir"]).resolve() == REPO / ".dvc" / "cache"  # DVC gives it absolute
    assert mine["core.remote"] == theirs["core.remote"] == "team"
    assert mine["remote.team.url"] == theirs["remote.team.url"]


def test_every_param_its_stages_name_is_in_the_file_named():
    """DVC reads the params files itself and fails a stage (after it ran) on a key they lack: the
    overlay names its own sections, params.yaml (its base) the keys the default stage reads."""
    stages = yaml.safe_load((PIPE / "dvc.yaml").read_text())["stages"]
    named = 0
    for name, st in stages.items():
        for entry in st.get("params", []):
            for file, keys in (entry.items() if isinstance(entry, dict) else [("params.yaml", [entry])]):
                doc = yaml.safe_load((PIPE / file).read_text())  # relative to the stage's folder
                for key in keys:
                    node = doc
                    for part in key.split("."):
                        assert isinstance(node, dict) and part in node, f"{name}: {file} has no {key}"
                        node = node[part]
                    named += 1
    assert named > 20
