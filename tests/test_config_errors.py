"""One line for every bad value: a `--set`, params-file or CLI option value that does not fit the
config's types (the items of its lists and mappings included) is one `error: <key>: expected <what>,
got <value>` line and exit code 1, at load time, in every command that loads the config; never a
traceback (an option of the wrong type, `--k many`: one line too, with click's usage code 2). Good
values still load, as given; `slq search --k` has the search service's bound, checked first.

Property-based (hypothesis) over the whole config tree: the keys are read from the dataclasses, the
wrong values drawn at random and judged by an oracle written here (not the loader's own check), then
run through the CLI in-process (typer's CliRunner); a few cases in a real process.
"""

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import types
import typing
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

import cli
from slq.mlops.config import (
    BENCHMARK_OPTIONS,
    METHOD_PROMPTS,
    Config,
    ConfigError,
    MethodsConfig,
    load_config,
    parse_value,
)
from slq.recipe import FitConfig

REPO = Path(__file__).resolve().parents[1]
FAST = settings(max_examples=40, deadline=None, database=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])


# --- the config tree and an oracle of what fits ---------------------------------------------------------

def leaves(cls=Config, prefix: str = "") -> dict:
    """{dotted key: type} for every setting of the tree (a section's keys, down to corpus.storage)."""
    hints = typing.get_type_hints(cls)
    out = {}
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(hints[f.name]):
            out.update(leaves(hints[f.name], key + "."))
        else:
            out[key] = hints[f.name]
    return out


LEAVES = leaves()


def fits(hint, v) -> bool:
    """Whether `v` is a value of type `hint` (an int is a float; a bool is neither)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(fits(a, v) for a in args)
    if origin is typing.Literal:
        return any(v == a and type(v) is type(a) for a in args)
    if hint is type(None):
        return v is None
    if hint is int:
        return type(v) is int
    if hint is float:
        return type(v) in (int, float)
    if hint in (bool, str):
        return type(v) is hint
    if hint is list or origin is list:
        return isinstance(v, list) and all(fits(args[0], x) for x in v if args)
    if hint is dict or origin is dict:
        return isinstance(v, dict) and all(fits(args[0], k) and fits(args[1], x) for k, x in v.items() if args)
    raise AssertionError(f"the oracle has no rule for {hint!r}")


def test_the_oracle_knows_every_type_in_the_tree():
    for hint in LEAVES.values():
        fits(hint, None)  # raises for a type it cannot judge
    assert {"evaluate.benchmarks", "evaluate.ks", "methods.compare", "pretrain.mix", "index.refine_factors",
            "corpus.storage.region", "train.lr", "prompts.system", "root"} <= set(LEAVES)


# --- values -----------------------------------------------------------------------------------------

scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6),
                    st.floats(allow_nan=False, allow_infinity=False, width=32), st.text(max_size=8))
anything = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                         st.dictionaries(st.text(max_size=5), inner, max_size=3)),
                        max_leaves=5)


def as_set(key: str, value) -> str:
    """`--set key=value`, the value as JSON (YAML reads it as the same value, but for a few
    floats: `through_cli` says what the loader gets)."""
    return f"{key}={json.dumps(value)}"


def through_cli(key: str, value):
    """The value the loader gets from `as_set(key, value)` (YAML 1.1 reads JSON's 1e-05 as text)."""
    return parse_value(key, json.dumps(value))


def get(cfg, key: str):
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg


# --- the CLI ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def proj(tmp_path_factory):
    """The project's own params.yaml in a folder of its own, with a train metrics file (so `slq
    metrics` answers 0 on a good config) and nothing else: no index, no tracking store, no data."""
    root = tmp_path_factory.mktemp("cfgerr")
    shutil.copy(REPO / "params.yaml", root / "params.yaml")
    (root / "metrics").mkdir()
    (root / "metrics" / "train.json").write_text(json.dumps({"steps": 3, "final_loss": 0.5}))
    return root


RUNNER = CliRunner(env={"COLUMNS": "80"})

# commands that load the config first and have no side effect even on a good config in `proj`
QUICK = (["metrics"], ["search", "a red circle"], ["runs", "list"], ["promote", "1"])


def cli_run(proj: Path, args: list[str], *sets: str, params: Path | None = None):
    extra = [a for s in sets for a in ("--set", s)]
    return RUNNER.invoke(cli.app, [*args, "-p", str(params or proj / "params.yaml"), *extra])


def one_error(res, code: int = 1) -> str:
    """The one `error: ...` line of a failed command: that exit code, no traceback, nothing else."""
    assert res.exit_code == code, (res.exit_code, res.output, res.exception)
    assert res.exception is None or isinstance(res.exception, SystemExit), repr(res.exception)
    assert "Traceback" not in res.output and res.stdout == "", res.output
    lines = [x for x in res.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    return lines[0]


def names(line: str, key: str):
    """The error line names `key` (or an item or entry under it) first, then what it expects."""
    assert line.startswith(f"error: {key}") and line[len(f"error: {key}")] in ":[.", (key, line)
    assert ": expected " in line and ", got " in line, line


# --- wrong types, anywhere in the tree ---------------------------------------------------------------

@FAST
@given(key=st.sampled_from(sorted(LEAVES)), value=anything, command=st.sampled_from(QUICK))
def test_a_value_of_the_wrong_type_is_one_line_in_every_command(proj, key, value, command):
    value = through_cli(key, value)  # what the command line hands the loader
    assume(not fits(LEAVES[key], value))
    line = one_error(cli_run(proj, command, as_set(key, value)))
    names(line, key)


@FAST
@given(key=st.sampled_from(sorted(LEAVES)), value=anything)
def test_a_params_file_value_of_the_wrong_type_is_one_line(proj, key, value):
    assume(not fits(LEAVES[key], value))
    raw = yaml.safe_load((proj / "params.yaml").read_text())
    node = raw
    *parents, leaf = key.split(".")
    for p in parents:
        node = node.setdefault(p, {})
    node[leaf] = value
    bad = proj / "bad.yaml"
    bad.write_text(yaml.safe_dump(raw))
    names(one_error(cli_run(proj, ["metrics"], params=bad)), key)


LISTS = {key: hint for key, hint in LEAVES.items() if typing.get_origin(hint) is list}
MAPS = {key: hint for key, hint in LEAVES.items() if typing.get_origin(hint) is dict}


@FAST
@given(key=st.sampled_from(sorted(LISTS)), item=anything, at=st.integers(0, 3), command=st.sampled_from(QUICK))
def test_a_wrong_item_in_a_list_is_named_by_its_index(proj, key, item, at, command):
    (item_type,) = typing.get_args(LISTS[key])
    good = list(get(load_config(proj / "params.yaml"), key))
    at = min(at, len(good))
    value = [*good[:at], item, *good[at:]]
    assume(not fits(item_type, through_cli(key, value)[at]))
    names(one_error(cli_run(proj, command, as_set(key, value))), f"{key}[{at}]")


@FAST
@given(key=st.sampled_from(sorted(MAPS)), name=st.sampled_from(["lora", "caption"]), value=anything)
def test_a_wrong_value_in_a_mapping_is_named_by_its_key(proj, key, name, value):
    assume(not fits(typing.get_args(MAPS[key])[1], through_cli(key, value)))
    names(one_error(cli_run(proj, ["metrics"], as_set(f"{key}.{name}", value))), f"{key}.{name}")


# evaluate.benchmarks: a list of mappings, each with a registered `name`, its common options typed
entry_option = st.sampled_from(sorted(set(BENCHMARK_OPTIONS) - {"name"}))


@FAST
@given(entry=st.one_of(scalars, st.lists(scalars, max_size=2),
                       st.dictionaries(st.sampled_from(["split", "root", "label", "name:world"]), scalars, max_size=3)),
       at=st.integers(0, 3), command=st.sampled_from(QUICK))
def test_a_benchmark_entry_without_a_name_is_one_line(proj, entry, at, command):
    entries = [{"name": "world", "split": "test"}, {"name": "world_knowledge"}]
    at = min(at, len(entries))
    value = [*entries[:at], entry, *entries[at:]]
    line = one_error(cli_run(proj, command, as_set("evaluate.benchmarks", value)))
    names(line, f"evaluate.benchmarks[{at}]")
    assert "`name`" in line and "{name: world, split: test}" in line


@FAST
@given(option=entry_option, value=anything, at=st.integers(0, 1))
def test_a_benchmark_option_of_the_wrong_type_is_named(proj, option, value, at):
    entries = [{"name": "world", "split": "test"}, {"name": "world_knowledge"}]
    entries[at] = {**entries[at], option: value}
    assume(not fits(BENCHMARK_OPTIONS[option], through_cli("evaluate.benchmarks", entries)[at][option]))
    names(one_error(cli_run(proj, ["metrics"], as_set("evaluate.benchmarks", entries))),
          f"evaluate.benchmarks[{at}].{option}")


# --- whatever is typed: a config, or one line ----------------------------------------------------------

# what a command line can hold: no line breaks (a path with one is a valid setting, printed on two lines)
typed = st.text(st.characters(blacklist_categories=("Cs", "Zl", "Zp"), blacklist_characters="\n\r\x0b\x0c\x1c\x1d\x1e\x85"),
                max_size=20)


@FAST
@given(key=st.one_of(st.sampled_from(sorted(LEAVES)), typed), raw=typed)
def test_whatever_is_set_the_answer_is_a_config_or_one_line(proj, key, raw):
    res = cli_run(proj, ["metrics"], f"{key}={raw}")
    assert res.exception is None or isinstance(res.exception, SystemExit), repr(res.exception)
    assert "Traceback" not in res.output
    if res.exit_code != 0:
        one_error(res)


# --- good values still load, as given -----------------------------------------------------------------

METHOD_NAMES = ["slq", *MethodsConfig().compare]
WORLD = ["world", "world_knowledge", "world_composed", "world_i2i", "world_everyday"]
SPECIAL = {  # settings whose values a type alone does not describe (names, choices, bounds)
    "train.method": st.sampled_from(METHOD_NAMES),
    "train.pooling": st.sampled_from([None, "queries"]),  # train.method: slq
    "train.init": st.sampled_from(["random", "text:a red circle"]),
    "methods.compare": st.lists(st.sampled_from(MethodsConfig().compare), unique=True),
    "methods.lr": st.dictionaries(st.sampled_from(METHOD_NAMES), st.one_of(st.none(), st.floats(1e-6, 1.0))),
    "methods.pooling": st.fixed_dictionaries({}, optional={"zero_shot": st.just("last_token"),
                                                           "lora": st.sampled_from(["last_token", "queries"]),
                                                           "full": st.just("last_token")}),
    "methods.prompts": st.dictionaries(st.sampled_from(METHOD_NAMES), st.sampled_from(METHOD_PROMPTS)),
    "methods.workers": st.one_of(st.just("auto"), st.integers(1, 64)),
    "methods.benchmarks": st.lists(st.sampled_from(WORLD), unique=True),
    "evaluate.benchmarks": st.lists(st.sampled_from(WORLD), unique=True).map(
        lambda ns: [{"name": n, "split": "test"} for n in ns]),
}


def good(hint):
    """Values of type `hint` that every rule takes (whole numbers >= 1: counts and sizes)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return st.one_of(*[good(a) for a in args])
    if origin is typing.Literal:
        return st.sampled_from(args)
    if hint is list or origin is list:
        return st.lists(good(args[0]), min_size=1, max_size=3)
    if hint is dict or origin is dict:
        return st.dictionaries(st.text(max_size=6), good(args[1]), max_size=3)
    return {type(None): st.none(), int: st.integers(1, 10**6), bool: st.booleans(), str: st.text(max_size=10),
            float: st.floats(-1e3, 1e3)}[hint]


@settings(max_examples=120, deadline=None, database=None, derandomize=True)
@given(data=st.data())
def test_good_values_load_as_given(data):
    key = data.draw(st.sampled_from(sorted(LEAVES)))
    value = data.draw(SPECIAL[key] if key in SPECIAL else good(LEAVES[key]))
    got = get(load_config(REPO / "params.yaml", {key: value}), key)
    assert got == value and (type(got) is float) == (LEAVES[key] is float or type(value) is float)


def test_a_good_value_on_the_command_line_runs_the_command(proj):
    for s in ("evaluate.ks=[1, 2]", "train.lr=1e-3", "methods.workers=2", "methods.compare=[lora]",
              "evaluate.benchmarks=[{name: world, split: test}, {name: world, label: w2}]", "train.pooling=queries"):
        res = cli_run(proj, ["metrics"], s)
        assert res.exit_code == 0, (s, res.output)


# --- what a type cannot say: names, bounds, the issue's own cases --------------------------------------

@pytest.mark.parametrize("value, key, words", [
    ("evaluate.benchmarks=[{name:world,split:test}]", "evaluate.benchmarks[0]", ["`name`", "space after each colon"]),
    ("evaluate.benchmarks=[{name: wrld}]", "evaluate.benchmarks[0].name", ["registered benchmark", "world_knowledge"]),
    ("evaluate.benchmarks=[{name: world}, {name: world}]", "evaluate.benchmarks[1]", ["label"]),
    ("evaluate.ks=[1, 0, 5]", "evaluate.ks[1]", [">= 1", "got 0"]),
    ("evaluate.ks=[]", "evaluate.ks", ["non-empty"]),
    ("evaluate.ks=1,5", "evaluate.ks", ["a list", "'1,5'"]),
    ("index.max_k=0", "index.max_k", [">= 1"]),
    ("methods.compare=[zero_shot, slq]", "methods.compare[1]", ["zero_shot, lora, full", "train stage"]),
    ("methods.compare=[zero_shot, lorra]", "methods.compare[1]", ["'lorra'"]),
    ("methods.lr={lorra: 0.1}", "methods.lr", ["registered methods", "'lorra'"]),
    ("methods.prompts.lora=mine", "methods.prompts.lora", ["pipeline", "summarize"]),
    ("methods.workers=none", "methods.workers", ["'auto'"]),
    ("methods.benchmarks=[world, nope]", "methods.benchmarks[1]", ["evaluate.benchmarks label"]),
    ("train.method=slqq", "train.method", ["registered method"]),
    ("train.pooling=last_token", "train.pooling", ["queries"]),
    ("train.init=randomly", "train.init", ["text:<words>"]),
    ("train.builtin.num_queries=0", "train.builtin.num_queries", [">= 1"]),
    ("train.steps=[1", "train.steps", ["a YAML value", "'[1'"]),
    ("train=5", "train", ["a mapping"]),
])
def test_names_bounds_and_yaml_slips_are_one_line(proj, value, key, words):
    line = one_error(cli_run(proj, ["metrics"], value))
    names(line, key)
    for w in words:
        assert w in line, (w, line)


CONFIG_FIRST = (["metrics"], ["search", "a red circle"], ["stage", "evaluate"], ["stage", "train"], ["run"],
                ["flow", "run"], ["evaluate"], ["promote", "1"], ["serve"], ["readme"], ["runs", "list"],
                ["runs", "show", "abc"], ["runs", "compare", "a", "b"], ["data", "generate"], ["corpus", "status"],
                ["study", "seeds", "0"])


@pytest.mark.parametrize("command", CONFIG_FIRST, ids=" ".join)
def test_every_command_that_loads_the_config_refuses_a_bad_value_first(proj, command, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    files = sorted(proj.rglob("*"))
    line = one_error(cli_run(proj, command, "evaluate.benchmarks=[{name:world,split:test}]"))
    names(line, "evaluate.benchmarks[0]")
    assert sorted(proj.rglob("*")) == files and list(tmp_path.iterdir()) == []  # nothing written


def test_the_methods_the_defaults_name_are_registered():
    """load_config trusts the defaults' method names without importing the registry (torch): they must be it."""
    from slq.methods import METHODS, check_method, compared_methods

    m, t = MethodsConfig(), FitConfig()
    assert t.method in METHODS and set(m.compare) <= set(compared_methods())
    for name, pooling in m.pooling.items():
        check_method(name, pooling)
    assert set(m.lr) | set(m.prompts) <= set(METHODS)


def test_the_loader_and_the_stages_agree_on_choices_and_path_options():
    from slq.mlops.evaluation import PATH_OPTIONS
    from slq.mlops.models import PROMPT_CHOICES

    assert tuple(METHOD_PROMPTS) == tuple(PROMPT_CHOICES)
    assert set(PATH_OPTIONS) <= set(BENCHMARK_OPTIONS)
    assert all(BENCHMARK_OPTIONS[k] == (str | None) for k in PATH_OPTIONS)


def test_a_loaded_config_is_never_a_silent_error():
    with pytest.raises(ConfigError, match=r"^evaluate\.benchmarks\[0\]: expected a mapping with a `name`"):
        load_config(REPO / "params.yaml", ["evaluate.benchmarks=[{name:world,split:test}]"])
    with pytest.raises(ConfigError, match=r"^pretrain\.mix\.caption: expected a number, got 'x'$"):
        load_config(REPO / "params.yaml", {"pretrain.mix": {"caption": "x"}})
    with pytest.raises(ConfigError, match=r"^methods: expected a mapping"):
        load_config(REPO / "params.yaml", {"methods": []})  # an empty list is not an empty section


# --- `slq search --k`: the service's bound, before anything is loaded ----------------------------------

def test_search_k_has_the_services_bound_before_any_index(proj):
    for k in ("0", "101", "1000000"):
        line = one_error(cli_run(proj, ["search", "a red circle", "--k", k]))
        assert line == f"error: --k must be between 1 and 100 (index.max_k), got {k}", line
    # the bound is index.max_k, as in the service: raised, it lets 150 through to the next check
    line = one_error(cli_run(proj, ["search", "a red circle", "--k", "150"], "index.max_k=200"))
    assert "--k" not in line and "index" in line.lower()
    from slq.mlops.config import IndexConfig

    assert IndexConfig().k_error(101) == "k must be between 1 and 100 (index.max_k), got 101"  # the service's words


def test_an_option_of_the_wrong_type_is_one_line_with_the_usage_code(proj):
    line = one_error(cli_run(proj, ["search", "a red circle", "--k", "many"]), code=2)
    assert "'--k'" in line and "integer" in line and "search --help" in line
    line = one_error(cli_run(proj, ["search", "a red circle", "--kk", "3"]), code=2)
    assert "--kk" in line


# --- in a real process -------------------------------------------------------------------------------------

@pytest.mark.parametrize("args", [
    ["metrics", "--set", "evaluate.benchmarks=[{name:world,split:test}]"],
    ["stage", "evaluate", "--set", "evaluate.benchmarks=[{name:world,split:test}]"],
    ["search", "a red circle", "--k", "1000000"],
], ids=["metrics", "stage-evaluate", "search-k"])
def test_one_line_in_a_real_process(proj, args):
    res = subprocess.run([sys.executable, str(REPO / "cli.py"), *args], cwd=proj, capture_output=True, text=True,
                         timeout=120, env={**os.environ, "COLUMNS": "80"}, check=False)
    assert res.returncode == 1, (res.returncode, res.stderr)
    assert res.stdout == "" and res.stderr.count("\n") == 1 and res.stderr.startswith("error: "), res.stderr
    assert ("evaluate.benchmarks[0]: expected a mapping with a `name`" in res.stderr
            or "--k must be between 1 and 100 (index.max_k), got 1000000" in res.stderr), res.stderr
