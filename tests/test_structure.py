"""The package's shape: no import cycles, imports that point one way between the
packages (docs/DESIGN.md "Import rules"), and no public name that two modules define
with different meanings."""

from __future__ import annotations

import ast
import collections
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = "neva_jax"

# What each package may import inside neva_jax (besides itself); checked on every
# import statement, the ones inside functions included.
ALLOWED = {
    "neva_jax.model": {"neva_jax.sharding"},
    "neva_jax.data": set(),
    "neva_jax.convert": {
        "neva_jax.model",
        "neva_jax.data",
        "neva_jax.sharding",
        "neva_jax.platform",
    },
    "neva_jax.eval": {
        "neva_jax.model",
        "neva_jax.data",
        "neva_jax.convert",
        "neva_jax.sharding",
        "neva_jax.platform",
    },
}
# Entry points (`python -m ...`) that may also import these: the data CLIs read an
# experiment file as `main` does (`neva_jax.config`), which the data library may not.
ENTRY_POINTS = {"neva_jax.data.__main__": {"neva_jax.config"}}
# Public names that several modules define with the same meaning, each in its own
# module's terms: entry points, the per-model config constructors and presets, the
# converters' per-model key tables, and type aliases.
SAME_MEANING = {
    "main": "the module's command-line entry point",
    "SUBCOMMAND": "the name of the convert subcommand the module implements",
    "IMPORT_HELP": "the --help text of the module's convert import subcommand",
    "EXPORT_HELP": "the --help text of the module's convert export subcommand",
    "add_export_arguments": "the module's convert export subcommand's arguments",
    "run_export": "runs the module's convert export subcommand",
    "parse_args": "the module's command-line parser",
    "from_hf_config": "this module's config from a transformers config.json",
    "param_table": "this model's Hugging Face key table",
    "tiny": "this module's tiny preset",
    "llama2_7b_chat": "this module's LLaMA-2-7B-Chat preset",
    "llama2_13b_chat": "this module's LLaMA-2-13B-Chat preset",
    "llava_v15_7b": "this module's LLaVA-1.5-7B preset",
    "PyTree": "the alias Any for a pytree",
    "LR": "the benchmark's learning rate, one per side (bench/hf_side, bench/jax_side)",
    "GRAD_CLIP": "the benchmark's clipping norm, one per side",
}


def _modules() -> dict[str, pathlib.Path]:
    out = {}
    for path in sorted((ROOT / PACKAGE).rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


MODULES = _modules()


def _resolve(name: str) -> str | None:
    """The module `name` refers to (a module, or the module that defines it)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _imports(module: str) -> set[str]:
    """Every neva_jax module `module` imports, with the packages the import runs."""
    tree = ast.parse(MODULES[module].read_text())
    is_package = MODULES[module].name == "__init__.py"
    found = set()
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module.split(".")[: len(module.split(".")) - node.level + is_package]
                base = ".".join([*anchor, base] if base else anchor)
            names = [f"{base}.{a.name}" for a in node.names] + [base]
        for name in names:
            if name.split(".")[0] != PACKAGE:
                continue
            target = _resolve(name)
            while target and target != PACKAGE:  # importing a.b.c runs a.b's __init__ too
                found.add(target)
                target = target.rpartition(".")[0]
    found.discard(module)
    return found


GRAPH = {m: _imports(m) for m in MODULES}


def _cycle() -> list[str] | None:
    """One import cycle among the modules, or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for n in sorted(GRAPH[m]):
            if state.get(n) == 1:
                return [*stack[stack.index(n) :], n]
            if n not in state and (found := visit(n)):
                return found
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(GRAPH):
        if m not in state and (found := visit(m)):
            return found
    return None


def test_no_import_cycles():
    assert _cycle() is None, " -> ".join(_cycle())


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_imports_point_one_way(package):
    bad = []
    for module, targets in GRAPH.items():
        if module != package and not module.startswith(package + "."):
            continue
        for target in targets:
            inside = target == package or target.startswith(package + ".")
            may = ALLOWED[package] | ENTRY_POINTS.get(module, set())
            allowed = any(target == a or target.startswith(a + ".") for a in may)
            if not inside and not allowed and target != PACKAGE:
                bad.append(f"{module} imports {target}")
    assert not bad, bad


def _public_definitions(path: pathlib.Path) -> list[str]:
    names = []
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.append(node.name)
        elif isinstance(node, ast.Assign):
            names += [t.id for t in node.targets if isinstance(t, ast.Name)]
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.append(node.target.id)
    return [n for n in names if not n.startswith("_")]


def test_no_public_name_is_defined_twice():
    where = collections.defaultdict(list)
    for module, path in MODULES.items():
        for name in _public_definitions(path):
            where[name].append(module)
    twice = {n: ms for n, ms in where.items() if len(ms) > 1 and n not in SAME_MEANING}
    assert not twice, twice


def test_the_checks_see_the_package():
    assert len(MODULES) > 50
    assert "neva_jax.train.build" in GRAPH["neva_jax.train.loop"]
    assert "neva_jax.model.neva" in GRAPH["neva_jax.config"]
    assert "neva_jax.convert.checkpoint" in GRAPH["neva_jax.eval.generate"]
