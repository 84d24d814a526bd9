"""The real-LM pipeline's configuration (pipelines/smollm2): a params overlay on params.yaml whose
outputs never collide with the default pipeline's, read by the same stage code, and a dvc.yaml that
DVC accepts beside the default one. (Running it needs PyPI and ~40 min: docs/methods.md.)"""

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
    assert Path(smol.root).resolve() == Path.cwd().resolve()  # `root: .`: run from the project folder (wdir ../..)
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


def test_dvc_reads_both_pipelines_and_plain_repro_stays_the_default():
    """`dvc stage list` accepts the real-LM dvc.yaml (no output claimed twice across the project),
    every stage runs from the project folder on the real-LM params, and the default dvc.yaml names
    none of its stages (plain `dvc repro` runs the default pipeline only)."""
    out = subprocess.run([sys.executable, "-m", "dvc", "stage", "list", "-R", "pipelines"], cwd=REPO,
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    names = [line.split()[0] for line in out.stdout.splitlines() if line.strip()]
    assert names == [f"pipelines/smollm2/dvc.yaml:{s}" for s in ("gguf", "pretrain", "train", "embed", "evaluate",
                                                                           "methods", "compare")]
    stages = yaml.safe_load((PIPE / "dvc.yaml").read_text())["stages"]
    for name, st in stages.items():
        assert st["wdir"] == "../.."
        assert name == "gguf" or st["cmd"] == f"python cli.py stage {name} -p pipelines/smollm2/params.yaml"
    assert "smollm2" not in (REPO / "dvc.yaml").read_text()


def test_every_param_its_stages_name_is_in_the_file_named():
    """DVC reads the params files itself and fails a stage (after it ran) on a key they lack: the
    overlay names its own sections, params.yaml (its base) the keys the default stage reads."""
    stages = yaml.safe_load((PIPE / "dvc.yaml").read_text())["stages"]
    named = 0
    for name, st in stages.items():
        for entry in st.get("params", []):
            for file, keys in (entry.items() if isinstance(entry, dict) else [("params.yaml", [entry])]):
                doc = yaml.safe_load((REPO / file).read_text())
                for key in keys:
                    node = doc
                    for part in key.split("."):
                        assert isinstance(node, dict) and part in node, f"{name}: {file} has no {key}"
                        node = node[part]
                    named += 1
    assert named > 20
