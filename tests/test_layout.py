"""The package's layout is its architecture: layers that import only from the layers before them, no import
cycle (function-level imports included), a short root, a one-line job for every subpackage."""

from __future__ import annotations

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "convnext_audio_jax"
NAME = PACKAGE.name
# Lowest first; a module may import from its own layer and the ones before it.
LAYERS = ["runtime", "native", "models", "data", "artifacts", "convert", "hub", "evaluation", "training", "inference",
          "export", "downstream", "serve", "<root>"]
ROOT_MODULES_AT_MOST = 5


def module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, pathlib.Path]:
    return {module_name(path): path for path in PACKAGE.rglob("*.py")}


def imports_of(name: str, path: pathlib.Path, known: set[str]) -> set[str]:
    """Every package module ``name`` imports, wherever the import statement sits."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.split(".")[0] == NAME)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            if base.split(".")[0] != NAME:
                continue
            for alias in node.names:  # `from pkg import module` imports the module; `from module import name` the module
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base)
    return found - {name}


def import_graph() -> dict[str, set[str]]:
    found = modules()
    return {name: imports_of(name, path, set(found)) for name, path in found.items()}


def layer_of(name: str) -> int:
    parts = name.split(".")
    top = parts[1] if len(parts) > 1 and (PACKAGE / parts[1]).is_dir() else "<root>"
    return LAYERS.index(top)


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, " → ".join(cycle)


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_layers_import_only_downwards():
    wrong = [f"{name} (layer {LAYERS[layer_of(name)]}) imports {target} (layer {LAYERS[layer_of(target)]})"
             for name, targets in import_graph().items() for target in sorted(targets)
             if layer_of(target) > layer_of(name)]
    assert not wrong, "\n".join(wrong)


def test_every_subpackage_is_a_layer_with_a_one_line_job():
    subpackages = sorted(p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file())
    assert set(subpackages) == set(LAYERS) - {"<root>"}
    for name in subpackages:
        doc = ast.get_docstring(ast.parse((PACKAGE / name / "__init__.py").read_text(encoding="utf-8")))
        assert doc, f"{name}/__init__.py has no docstring"
        assert len(doc.splitlines()[0]) <= 150, f"{name}: the first line says the job in one line"


def test_root_is_short():
    root = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert len(root) <= ROOT_MODULES_AT_MOST, root


def test_nothing_imports_a_moved_name():
    """The old names are for users' code; the project itself imports the new ones."""
    from convnext_audio_jax import MOVED_MODULES

    moved = {f"{NAME}.{old}" for old in MOVED_MODULES}
    root = PACKAGE.parent
    users = [*PACKAGE.rglob("*.py"), *(root / "tests").glob("*.py"), *(root / "benchmarks").glob("*.py"),
             *(root / "configs").glob("*.py"), *(root / "convert").glob("*.py"), root / "train.py"]
    wrong = []
    for path in users:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
                names = [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
            else:
                continue
            wrong += [f"{path.relative_to(root)}:{node.lineno} imports {name}" for name in names if name in moved]
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize("old", ["checkpoint", "pretrained", "evaluate", "xla", "training.lock"])
def test_moved_module_names_still_import(old):
    import importlib
    import sys

    import convnext_audio_jax

    sys.modules.pop(f"{NAME}.{old}", None)  # imported before: the warning comes with a first import only
    with pytest.warns(DeprecationWarning, match="is now"):
        module = importlib.import_module(f"{NAME}.{old}")
    assert module is importlib.import_module(f"{NAME}.{convnext_audio_jax.MOVED_MODULES[old]}")
