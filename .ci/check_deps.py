"""CI: each dvc.yaml stage lists, among its deps, every file of the code it runs.

    python .ci/check_deps.py [dvc.yaml ...]      (default: dvc.yaml and pipelines/smollm2/dvc.yaml)

A stage's code is the modules its cmd runs (`python cli.py stage NAME` -> slq.mlops.stages.NAME,
the runner slq.mlops.runner and the config slq.mlops.config; other commands by the table
CLI_COMMANDS below; `cd DIR && python cli.py ...` runs the code in DIR, relative to the stage's wdir) and every slq module they import, transitively, as grimp reads the source
(imports inside functions included). Importing a module runs its packages' __init__.py first, so
those count too, except a package __init__.py that imports nothing (a docstring, constants, lazy
names). Imports by name (importlib) are invisible to grimp: DYNAMIC below says what each such
module loads, and a module that imports by name without an entry there fails the check.

Each module's file must be one of the stage's deps, or lie in a folder that is one; otherwise
`dvc repro` would not rerun the stage when that file changes. A missing dep, a code dep that does
not exist, or a command the table does not know: exit 1, naming the stage and the module.
Code deps that the stage does not import are reported as notes (they only cause extra reruns).

A stage whose code lies outside its own DVC project (pipelines/smollm2 is a DVC project of its own,
its stages run the project's slq/ from `cd ../..`) must list files, never folders: that project's
.dvcignore does not reach them, so DVC would hash a code folder with whatever else is in it (the
bytecode Python writes into __pycache__/), and the stage would look changed wherever the code ran.

    python .ci/check_deps.py --suggest     also print each stage's code deps as few as can be
    python .ci/check_deps.py --fix         rewrite each stage's code deps (slq/...) with them, in place
                                           (a folder where the stage runs more than half of its
                                           files, files alone for code outside the stage's DVC
                                           project; comments and the other deps are kept)
"""

from __future__ import annotations

import argparse
import ast
import os
import re
import shlex
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
DEFAULT_FILES = ["dvc.yaml", "pipelines/smollm2/dvc.yaml"]
PACKAGES = ("slq",)  # the code that deps must cover (cli.py is the thin entry; its own edits rerun nothing)

# `python cli.py <group> <command> ...` -> the modules that command runs (the work it calls, not the
# Typer code in slq.mlops.cli / slq.miniature.cli that parses and prints).
CLI_COMMANDS = {
    ("backbone", "gguf"): ["slq.miniature.smollm2"],
}

# Modules that import others by name (importlib), and what they may load that way.
DYNAMIC = {
    # the runner imports the stage named on the command line: that stage is an entry module already
    "slq.mlops.runner": lambda graph, root: [],
    # load_all() imports every benchmark module of the package (registration happens on import)
    "slq.benchmarks": lambda graph, root: sorted(graph.find_children("slq.benchmarks")),
    # the public API resolves its names lazily: `slq.SLQEncoder` imports slq.encoder, etc.
    "slq": lambda graph, root: sorted(set(_lazy_names(root).values())),
}
# Imports (inside functions) that no stage runs, so the closure does not follow them: grimp reads
# every import statement, called or not.
NOT_RUN: set[tuple[str, str]] = set()
BY_NAME = re.compile(r"\bimport_module\s*\(|__import__\s*\(|\bentry_points\s*\(|\bpkgutil\b")


class CheckError(Exception):
    pass


def _lazy_names(root: Path) -> dict:
    tree = ast.parse((root / "slq" / "__init__.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "_LAZY" for t in node.targets):
            return ast.literal_eval(node.value)
    return {}


def split_cmd(cmd: str) -> tuple[str, list[str]]:
    """(the folder the command runs in, relative to the stage's wdir, and its argv): a leading
    `cd DIR &&` moves it."""
    argv = shlex.split(cmd)
    if argv[:1] == ["cd"] and len(argv) >= 3 and argv[2] == "&&":
        return argv[1], argv[3:]
    return ".", argv


def code_root(cmd: str, wdir: Path) -> Path:
    """The folder whose slq/ the stage runs."""
    return (wdir / split_cmd(cmd)[0]).resolve()


def dvc_project(dvc_yaml: Path) -> Path | None:
    """The DVC project that holds this dvc.yaml: the nearest folder, its own or above, with a .dvc/."""
    for folder in [dvc_yaml.resolve().parent, *dvc_yaml.resolve().parent.parents]:
        if (folder / ".dvc").is_dir():
            return folder
    return None


def _outside(root: Path, project: Path | None) -> bool:
    """Code under `root` is outside the DVC project (so deps on it must be files)."""
    return project is not None and not (root == project or project in root.parents)


def entry_modules(cmd: str) -> list[str]:
    """The modules a stage's cmd runs."""
    argv = split_cmd(cmd)[1]
    if argv[:2] != ["python", "cli.py"] or len(argv) < 3:
        raise CheckError(f"unknown cmd {cmd!r}: not `python cli.py ...` (teach .ci/check_deps.py what it runs)")
    if argv[2] == "stage" and len(argv) >= 4:
        return [f"slq.mlops.stages.{argv[3]}", "slq.mlops.runner", "slq.mlops.config"]
    key = tuple(argv[2:4])
    if key not in CLI_COMMANDS:
        raise CheckError(f"unknown cmd {cmd!r}: add `cli.py {' '.join(key)}` and the modules it runs to "
                         "CLI_COMMANDS in .ci/check_deps.py")
    return CLI_COMMANDS[key]


class Code:
    """The import graph of the packages under one project root, and where their files are."""

    def __init__(self, root: Path):
        import grimp

        self.root = root
        sys.path.insert(0, str(root))  # analyse this root's copy, not whatever `import slq` finds elsewhere
        try:
            self.graph = grimp.build_graph(*PACKAGES, cache_dir=None)
        finally:
            sys.path.remove(str(root))

    def file(self, module: str) -> Path:
        base = self.root.joinpath(*module.split("."))
        return base / "__init__.py" if (base / "__init__.py").exists() else base.with_suffix(".py")

    def _imports_nothing(self, package: str) -> bool:
        tree = ast.parse(self.file(package).read_text())
        return not any(isinstance(n, (ast.Import, ast.ImportFrom)) and getattr(n, "module", None) != "__future__"
                       for n in tree.body)

    def closure(self, entries: list[str]) -> dict[str, str]:
        """{module: how it runs} for every module the entries run: imported (transitively), or a
        package whose __init__.py runs first; each with the chain of imports that runs it."""
        via: dict[str, tuple[str | None, str]] = {}  # module: (reached from, "import" | "package")
        todo = []
        for m in entries:
            if m not in self.graph.modules:
                raise CheckError(f"module {m} does not exist")
            via[m] = (None, "import")
            todo.append(m)
        while todo:
            m = todo.pop()
            src = self.file(m).read_text()
            if BY_NAME.search(src) and m not in DYNAMIC:
                raise CheckError(f"{m} imports modules by name (importlib/pkgutil), which grimp cannot see: "
                                 "say what it loads in DYNAMIC in .ci/check_deps.py")
            nxt = {i for i in self.graph.find_modules_directly_imported_by(m) if (m, i) not in NOT_RUN}
            if m in DYNAMIC and via[m][1] == "import":  # an __init__ run as a package only calls nothing
                nxt |= set(DYNAMIC[m](self.graph, self.root))
            for imported in sorted(nxt):
                # new, or seen so far only as a package (its __init__ run, not imported by name)
                if imported.split(".")[0] in PACKAGES and via.get(imported, (None, "package"))[1] == "package":
                    via[imported] = (m, "import")
                    todo.append(imported)
            parts = m.split(".")
            for i in range(1, len(parts)):  # `import a.b.c` runs a/__init__.py and a/b/__init__.py first
                pkg = ".".join(parts[:i])
                if pkg not in via:
                    via[pkg] = (m, "package")
                    todo.append(pkg)

        def chain(m: str) -> str:
            parent, how = via[m]
            if parent is None:
                return m
            if how == "package":
                return f"{chain(parent)}, which runs its package {m} first"
            return f"{chain(parent)} -> {m}"

        return {m: chain(m) for m, (_, how) in via.items() if how == "import" or not self._imports_nothing(m)}

    def folders_or_files(self, modules, most: float = 1.0, files_only: bool = False) -> list[str]:
        """Few deps that cover these modules' files: a package's folder where more than `most` of
        its Python files are among them (all of them by default; never a top-level package such
        as slq/, whose every edit would rerun the stage), the files themselves elsewhere; only
        files with `files_only`. Paths relative to the code's root."""
        need = {self.file(m).relative_to(self.root).as_posix() for m in modules}
        out = set(need)
        if files_only:
            return sorted(out)
        for m in sorted(self.graph.modules, key=lambda name: name.count(".")):
            folder = self.root.joinpath(*m.split("."))
            if "." not in m or not (folder / "__init__.py").exists():
                continue
            files = {f.relative_to(self.root).as_posix() for f in folder.rglob("*.py")}
            if len(files & need) >= most * len(files) and files & need:
                out = {o for o in out if o not in files} | {folder.relative_to(self.root).as_posix()}
        return sorted(o for o in out if not any(o.startswith(f + "/") for f in out))


def _is_code(p: Path, root: Path) -> bool:
    return any(p == root / pkg or (root / pkg) in p.parents for pkg in PACKAGES)


def _as_dep(path: str, root: Path, wdir: Path) -> str:
    """A path relative to the code's root, written as a dep (relative to the stage's wdir)."""
    return Path(os.path.relpath(root / path, wdir)).as_posix()


def check_file(dvc_yaml: Path, codes: dict, suggest: bool = False) -> tuple[list[str], list[str]]:
    """(errors, report lines) for one dvc.yaml."""
    doc = yaml.safe_load(dvc_yaml.read_text())
    errors, lines = [], []
    try:
        label = dvc_yaml.resolve().relative_to(REPO)
    except ValueError:
        label = dvc_yaml
    project = dvc_project(dvc_yaml)
    for stage, spec in (doc.get("stages") or {}).items():
        where = f"{label}:{stage}"
        if "matrix" in spec:
            errors.append(f"{where}: matrix stages are not supported by .ci/check_deps.py (use foreach)")
            continue
        spec = spec.get("do", spec)  # a foreach stage: its template (${item} in a dep names data, not code)
        wdir = (dvc_yaml.parent / spec.get("wdir", ".")).resolve()
        # ${...} deps name data and models (params.yaml paths), not code
        deps = [d for d in spec.get("deps", []) if isinstance(d, str) and "${" not in d]
        dep_paths = {d: (wdir / d).resolve() for d in deps}
        cmd = spec["cmd"] if isinstance(spec["cmd"], str) else " ".join(spec["cmd"])
        root = code_root(cmd, wdir)
        files_only = _outside(root, project)
        try:
            entries = entry_modules(cmd)
            if root not in codes:
                codes[root] = Code(root)
            code = codes[root]
            modules = code.closure(entries)
        except CheckError as e:
            errors.append(f"{where}: {e}")
            continue
        problems = [f"{where}: dep {d} does not exist" for d, p in dep_paths.items()
                    if _is_code(p, root) and not p.exists()]
        if files_only:  # that project's .dvcignore does not reach the code: bytecode would change the hash
            here = project.relative_to(REPO) if REPO in project.parents else project
            problems += [f"{where}: dep {d} is a folder outside the stage's DVC project ({here}/): DVC would "
                         "hash it with everything in it, __pycache__/ included; list its files (--fix does)"
                         for d, p in dep_paths.items() if _is_code(p, root) and p.is_dir()]
        used, missing = set(), []
        for m in sorted(modules):
            f = code.file(m).resolve()
            covering = [d for d, p in dep_paths.items() if p == f or p in f.parents]
            used.update(covering)
            if not covering:
                missing.append(m)
                problems.append(f"{where}: module {m} ({_as_dep(f.relative_to(root).as_posix(), root, wdir)}) "
                                f"is in no dep; it runs as {modules[m]}")
        unused = [d for d, p in dep_paths.items() if _is_code(p, root) and p.exists() and d not in used]
        if problems:
            errors += problems
            if missing:
                cover = [_as_dep(d, root, wdir) for d in code.folders_or_files(missing, files_only=files_only)]
                errors.append(f"{where}: deps that would cover them: {', '.join(cover)}")
        else:
            lines.append(f"ok    {where}: {len(modules)} modules, all in its deps")
        lines += [f"note  {where}: dep {d} holds no module the stage runs (it only causes reruns)" for d in unused]
        if suggest:  # a folder where the stage runs more than half of its files: fewer lines, a few extra reruns
            lines.append(f"code deps for {where} ({len(modules)} modules): " + ", ".join(
                _as_dep(d, root, wdir) for d in code.folders_or_files(modules, most=0.5, files_only=files_only)))
    return errors, lines


def fix_file(dvc_yaml: Path, codes: dict) -> None:
    """Replace each stage's code deps (those under slq/) with the suggested ones, where the first
    of them was; a text edit that keeps comments, the other deps and their order."""
    doc = yaml.safe_load(dvc_yaml.read_text())
    project = dvc_project(dvc_yaml)
    suggested, places = {}, {}
    for stage, spec in doc["stages"].items():
        spec = spec.get("do", spec)  # a foreach stage: its template
        wdir = (dvc_yaml.parent / spec.get("wdir", ".")).resolve()
        root = code_root(spec["cmd"], wdir)
        if root not in codes:
            codes[root] = Code(root)
        code = codes[root]
        deps = code.folders_or_files(code.closure(entry_modules(spec["cmd"])), most=0.5,
                                     files_only=_outside(root, project))
        suggested[stage] = [_as_dep(d, root, wdir) for d in deps]
        places[stage] = (wdir, root)
    out, stage, in_deps, placed, pad = [], None, False, False, ""
    for line in dvc_yaml.read_text().splitlines():
        key = re.match(r"^  ([A-Za-z0-9_-]+):", line)
        deps_key = re.match(r"^(    |      )deps:", line)  # a stage's, or a foreach stage's `do:`
        if key:
            stage, in_deps = key.group(1), False
        elif deps_key and stage in suggested:
            in_deps, placed, pad = True, False, deps_key.group(1) + "  "
        elif in_deps and line.startswith(pad + "- "):
            dep = line.split("- ", 1)[1].split("#")[0].strip()
            wdir, root = places[stage]
            if _is_code((wdir / dep).resolve(), root):
                if not placed:
                    out += [f"{pad}- {d}" for d in suggested[stage]]
                    placed = True
                continue
        elif in_deps and not line.startswith(pad):
            if not placed:  # the stage listed no code: its code goes last
                out += [f"{pad}- {d}" for d in suggested[stage]]
                placed = True
            in_deps = False
        out.append(line)
    dvc_yaml.write_text("\n".join(out) + "\n")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("dvc_yaml", nargs="*", type=Path, help=f"default: {' '.join(DEFAULT_FILES)}")
    ap.add_argument("--suggest", action="store_true", help="print the fewest code deps of each stage")
    ap.add_argument("--fix", action="store_true", help="rewrite each stage's code deps with them, then check")
    args = ap.parse_args(argv)
    codes: dict = {}
    if args.fix:
        for f in args.dvc_yaml or [REPO / f for f in DEFAULT_FILES]:
            fix_file(f, codes)
    errors = []
    for f in args.dvc_yaml or [REPO / f for f in DEFAULT_FILES]:
        e, lines = check_file(f, codes, args.suggest)
        errors += e
        print("\n".join(lines))
    if errors:
        print("\n".join(f"ERROR {e}" for e in errors))
        stages = sorted({e.split(": ", 1)[0] for e in errors})
        print(f"dvc.yaml deps: {len(stages)} stage(s) would not rerun when the code they run changes: "
              f"{', '.join(stages)}")
        return 1
    print("dvc.yaml deps: every stage lists the code it runs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
