"""Data flows one way: each module imports only from the modules before it, and nothing
below the study layer imports Optuna. A new module must take its place in LAYERS."""

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "lambda_search"
# config -> data and folds -> model -> train (one, packed) -> numerics -> objective -> bench -> study -> report -> CLI
LAYERS = ["_config", "_data", "_augment", "_folds", "_kernels", "_simam", "_models", "_checkpoint", "_train", "_pack", "_numerics", "_objective", "_bench",
          "_storage", "_study", "_report", "_select", "_plot", "cli"]
OPTUNA_FREE = set(LAYERS[: LAYERS.index("_bench") + 1])


def imports_of(path):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                if node.module:
                    yield "." + node.module.split(".")[0]
                else:
                    yield from ("." + alias.name for alias in node.names)
            else:
                yield node.module.split(".")[0]
        elif isinstance(node, ast.Import):
            yield from (alias.name.split(".")[0] for alias in node.names)


def test_every_module_has_a_layer():
    modules = {p.stem for p in PACKAGE.glob("*.py")} - {"__init__", "__main__"}
    assert modules == set(LAYERS)


def test_imports_go_one_way():
    for i, name in enumerate(LAYERS):
        for imported in imports_of(PACKAGE / f"{name}.py"):
            if imported.startswith("."):
                target = imported[1:]
                if not (PACKAGE / f"{target}.py").exists():  # a public name of the package
                    continue
                assert target in LAYERS[:i], f"{name} imports {target}, which comes after it"
            if name in OPTUNA_FREE:
                assert imported != "optuna", f"{name} must not import optuna"


def test_import_has_no_side_effects():
    # matplotlib (a drawing backend) is loaded only to draw; the package writes no files
    code = "import sys, os, lambda_search; print('matplotlib' in sys.modules, sorted(os.listdir('.')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=PACKAGE.parent / "tests")
    listing = subprocess.run([sys.executable, "-c", "import os; print(sorted(os.listdir('.')))"], capture_output=True,
                             text=True, check=True, cwd=PACKAGE.parent / "tests")
    assert out.stdout.split(" ", 1) == ["False", listing.stdout]
