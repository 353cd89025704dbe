"""The import graph of nnunet_ext (issue 18 item 2): no cycles, counting imports inside functions; no library
module imports a trainer; a trainer imports from another trainer only that trainer's class (to subclass it)."""

from __future__ import annotations

import ast
import os
import re
from pathlib import Path

import pytest
from support.paths import REPO

PACKAGE = REPO / "nnunet_ext"
#: the tools above the trainers: they list, check or run every trainer we ship
TOOLS = {"nnunet_ext.tools.doctor", "nnunet_ext.tools.demo", "nnunet_ext.trainer_dir.nnunet_ext_trainers"}


def module_files() -> dict[str, Path]:
    """Every module of the package (trainers/ and architectures/ through their links) by dotted name."""
    out = {}
    files = [Path(root) / f for root, _, names in os.walk(PACKAGE, followlinks=True) for f in names]
    for f in sorted(f for f in files if f.suffix == ".py"):
        parts = [p for p in f.relative_to(PACKAGE).with_suffix("").parts if p != "__init__"]
        out[".".join(["nnunet_ext", *parts])] = f
    return out


MODULES = module_files()


def resolve(name: str) -> str | None:
    """The module a dotted import name refers to (a module, or a name inside one)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def imports_of(module: str) -> dict[str, set[str]]:
    """{imported module: names imported from it} of every import statement in ``module``, at any depth."""
    tree = ast.parse(MODULES[module].read_text(encoding="utf-8"))
    package = module if MODULES[module].name == "__init__.py" else module.rpartition(".")[0]
    out: dict[str, set[str]] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                target = resolve(alias.name) if alias.name.startswith("nnunet_ext") else None
                if target:
                    out.setdefault(target, set())
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(
                    package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else [])
                )
            if not base.startswith("nnunet_ext"):
                continue
            for alias in node.names:
                target = resolve(f"{base}.{alias.name}")
                if target == f"{base}.{alias.name}":  # a submodule
                    out.setdefault(target, set())
                elif target:
                    out.setdefault(target, set()).add(alias.name)
    out.pop(module, None)
    return out


GRAPH = {m: imports_of(m) for m in MODULES}


def strongly_connected(graph: dict[str, dict]) -> list[list[str]]:
    """Tarjan's strongly connected components with more than one module (an import cycle each)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_the_graph_sees_the_whole_package():
    assert {
        "nnunet_ext.cli",
        "nnunet_ext.trainers.nnUNetTrainerBANet",
        "nnunet_ext.architectures.dodnet",
    } <= set(MODULES)
    # a function-level import counts: cli imports every command module only inside build_parser
    assert (
        "nnunet_ext.tools.doctor" not in GRAPH["nnunet_ext.cli"]
    )  # by name through importlib, not an import
    assert "nnunet_ext.multitask.partial_labels" in GRAPH["nnunet_ext.multitask.predict"]


def test_the_cycle_finder_finds_a_cycle():
    assert strongly_connected({"a": {"b": set()}, "b": {"c": set()}, "c": {"a": set()}, "d": {}}) == [
        ["a", "b", "c"]
    ]


def test_no_import_cycles():
    assert strongly_connected(GRAPH) == []


def test_no_library_module_imports_a_trainer():
    upward = {
        m: sorted(t for t in deps if t.startswith("nnunet_ext.trainers"))
        for m, deps in GRAPH.items()
        if not m.startswith("nnunet_ext.trainers") and m not in TOOLS
    }
    assert {m: t for m, t in upward.items() if t} == {}


@pytest.mark.parametrize("trainer", sorted(m for m in MODULES if m.startswith("nnunet_ext.trainers.")))
def test_a_trainer_imports_only_the_class_of_another_trainer(trainer):
    for target, names in GRAPH[trainer].items():
        if target.startswith("nnunet_ext.trainers"):
            assert names == {target.rpartition(".")[2]}, f"{trainer} imports {sorted(names)} from {target}"


def test_core_imports_nothing_of_ours_outside_core():
    """core/ is the bottom layer: the nnU-Net glue every method shares depends on no method, tool or network."""
    outside = {
        m: sorted(t for t in deps if not t.startswith("nnunet_ext.core") and t != "nnunet_ext")
        for m, deps in GRAPH.items()
        if m.startswith("nnunet_ext.core")
    }
    assert {m: t for m, t in outside.items() if t} == {}


def test_the_package_tree_is_the_documented_one():
    """Every subpackage of nnunet_ext/ is in the README's layout table (and the table names no other)."""
    readme = (PACKAGE.parent / "README.md").read_text(encoding="utf-8")
    documented = set(re.findall(r"^\| `nnunet_ext/([a-z_]+)/` \|", readme, flags=re.M))
    actual = {
        p.name
        for p in PACKAGE.iterdir()
        if p.is_dir() and not p.is_symlink() and (p / "__init__.py").exists()
    }
    linked = {p.name for p in PACKAGE.iterdir() if p.is_symlink()}
    assert documented == actual, (documented, actual)
    assert linked == {"architectures", "trainers", "presets"}
    flat = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert flat == ["__init__.py", "cli.py"], flat  # everything else lives in a subpackage


#: (what, pattern, the one module allowed to contain it): issue 18 item 3, one of each
ONE_HOME = [
    ("nnU-Net's predictor construction", r"\bnnUNetPredictor\(", "nnunet_ext.core.inference"),
    ("the --device auto resolution", r"""device\s*==\s*["']auto["']""", "nnunet_ext.core.inference"),
    ("a progress bar", r"\btqdm\b(?!\w)", "nnunet_ext.core.progress"),
    ("dataset id -> name", r"\bmaybe_convert_to_dataset_name\b", "nnunet_ext.core.paths"),
    ("the DDP / compile unwrap", r"\._orig_mod\b", "nnunet_ext.core.train_step"),
    ("a deep-supervision loss wrapper", r"\bDeepSupervisionWrapper\(", "nnunet_ext.core.train_step"),
]


@pytest.mark.parametrize("what,pattern,home", ONE_HOME, ids=[w for w, _, _ in ONE_HOME])
def test_each_piece_of_plumbing_has_one_home(what, pattern, home):
    """No second copy of the predictor builder, the device resolver, the progress wrapper, the dataset-name
    resolver, the unwrap or the deep-supervision wrapper: only their home module (and nnU-Net's own keyword
    ``allow_tqdm``) may spell them."""
    found = []
    for module, path in MODULES.items():
        text = path.read_text(encoding="utf-8").replace("allow_tqdm", "")
        if module != home and re.search(pattern, text):
            found.append(module)
    assert found == [], f"{what} outside {home}: {found}"
    assert re.search(pattern, MODULES[home].read_text(encoding="utf-8")), f"{home} lost {what}"
