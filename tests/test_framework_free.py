"""The framework-neutral core imports neither torch nor mindspore, and the package's import graph points
one way: feature packages over the bottom modules (config, fileio, errors), run over explain and data,
the audit over data; no two top-level parts import each other, even through a third."""

from __future__ import annotations

import ast
import subprocess
import sys

from conftest import REPO

PACKAGE = REPO / "src" / "nanguard"

# Every module of these is imported with torch and mindspore unimportable. Not listed: `backends`, the
# one place a framework is imported. `run/backend.py` names the backend modules by string (BACKENDS) and
# `cli.py` its commands (COMMANDS): both resolve them only when asked, so they import here too.
FRAMEWORK_FREE_PACKAGES = ("run", "guard", "explain", "audit", "data", "evaluation", "report")
FRAMEWORK_FREE_MODULES = ("config", "fileio", "errors", "progress", "cli")

# The nodes of the package-level graph: each subpackage and each top-level module of nanguard.
NODES = ("run", "guard", "explain", "audit", "data", "evaluation", "report", "backends",
         "config", "fileio", "errors", "progress", "cli")
BOTTOM = ("errors", "fileio")  # what config may import: nothing with a feature in it



def module_names() -> list[str]:
    names = [f"nanguard.{name}" for name in FRAMEWORK_FREE_MODULES]
    for package in FRAMEWORK_FREE_PACKAGES:
        for path in sorted((PACKAGE / package).rglob("*.py")):
            parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
            names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


CODE = """
import importlib
import sys
sys.modules["torch"] = None  # `import torch` (and torch.anything) raises ImportError
sys.modules["mindspore"] = None
for name in sys.argv[2:]:
    importlib.import_module(name)
loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "mindspore") and sys.modules[m] is not None)
assert not loaded, loaded
from nanguard.cli import main
assert main(["synth", sys.argv[1], "--images", "2", "--val-images", "1", "--size", "32", "--quiet"]) == 0
assert main(["audit", sys.argv[1] + "/annotations/instances_train.json", "--quiet"]) == 0
print("ok")
"""


def test_core_imports_no_framework(tmp_path):
    names = module_names()
    assert {"nanguard.run.trainer", "nanguard.explain.diagnose", "nanguard.data.cocofile"} <= set(names)
    result = subprocess.run([sys.executable, "-c", CODE, str(tmp_path / "d"), *names], capture_output=True,
                            text=True, env={"PYTHONPATH": str(REPO / "src"), "PATH": "/usr/bin:/bin"}, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("ok")


def _node(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if parts[0] == "nanguard" and len(parts) > 1 and parts[1] in NODES else None


def _imported(tree: ast.AST, module: str, is_package: bool) -> set[str]:
    """Every module an import statement names, at module level, in a function or under TYPE_CHECKING.
    Modules named only in strings (cli.COMMANDS, run.backend.BACKENDS, the explain.command forward to
    run.diagnose_command) are not imports: those are resolved when a command or backend is chosen."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")[: len(module.split(".")) - node.level + (1 if is_package else 0)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.add(target)
            found.update(f"{target}.{alias.name}" for alias in node.names)  # `from nanguard import config`
    return found


def package_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {node: set() for node in NODES}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        source = _node(".".join(parts))
        if source is None:
            continue  # nanguard/__init__.py and __main__.py sit above everything
        is_package = parts[-1] == "__init__"
        module = ".".join(parts[:-1] if is_package else parts)
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        for name in _imported(tree, module, is_package):
            target = _node(name)
            if target is not None and target != source:
                graph[source].add(target)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of `graph` as a path that comes back to its start, or None (a depth-first search)."""
    done: set[str] = set()

    def visit(stack: list[str]) -> list[str] | None:
        for target in sorted(graph[stack[-1]]):
            if target in stack:
                return stack[stack.index(target):] + [target]
            if target not in done:
                cycle = visit(stack + [target])
                if cycle:
                    return cycle
        done.add(stack[-1])
        return None

    for node in sorted(graph):
        cycle = None if node in done else visit([node])
        if cycle:
            return cycle
    return None


def test_top_level_parts_import_each_other_in_one_direction_only():
    graph = package_graph()
    assert "explain" in graph["run"] and "data" in graph["audit"]  # the graph is read at all
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)
    for node in ("errors", "fileio"):
        assert graph[node] <= set(BOTTOM), f"{node} imports {sorted(graph[node] - set(BOTTOM))}"


def test_config_imports_no_feature_package():
    assert package_graph()["config"] <= set(BOTTOM)
