"""Data flows one way: each module imports only from the modules before it (its own
subpackage's earlier modules, or the subpackages below its own), nothing below the store
imports Optuna, and reading a study imports no torch. A new module must take its place in
LAYERS."""

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "lambda_search"
# Subpackages from the ground up, each with its modules in order: config and points -> data and folds -> networks
# -> training of one (lambda, fold), alone or packed, and a point's run -> storage and status -> timing -> the
# answer -> workers and studies -> CLI
LAYERS = {
    "": ["config", "configfile", "points", "strategy"],
    "data": ["datasets", "augment", "folds"],
    "nn": ["kernels", "simam", "registry", "resnet", "preresnet", "wideresnet", "mobilenetv2", "official"],
    "train": ["engine", "foldrun", "single", "packnet", "packstep", "pack", "numerics", "groups", "plan"],
    "store": ["failures", "locks", "storage", "status", "claims"],
    "bench": ["projection", "measure", "run"],
    "report": ["select", "tables", "plot", "evaluation", "evaluation_plot"],
    "search": ["worker", "supervise", "study", "columns", "evaluate", "delete", "slurm", "submit"],
    "cli": ["parser", "common", "cluster", "commands"],
}
ORDER = [f"{pkg}.{m}" if pkg else m for pkg, modules in LAYERS.items() for m in modules]
GROUND = ("config", "configfile", "points", "strategy")
OPTUNA_FREE = {m for m in ORDER if m.split(".")[0] in (*GROUND, "data", "nn", "train", "bench")}
# what reading a study imports: never torch (a finished study is read on a laptop without it)
TORCH_FREE = {m for m in ORDER if m.split(".")[0] in (*GROUND, "store", "report")} | {"nn.registry"}


def module_path(dotted: str) -> Path:
    return PACKAGE.joinpath(*dotted.split(".")).with_suffix(".py")


def imports_of(path, dotted=None):
    """The modules ``path`` imports: absolute names by their first part, the package's own as
    ".<dotted name under lambda_search>" (``dotted``: the module's own dotted name)."""
    here = (dotted or path.stem).split(".")[:-1]
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = here[: len(here) - (node.level - 1)]
                if node.module:
                    yield "." + ".".join(base + node.module.split("."))
                else:
                    yield from ("." + ".".join(base + [alias.name]) for alias in node.names)
            else:
                yield node.module.split(".")[0]
        elif isinstance(node, ast.Import):
            yield from (alias.name.split(".")[0] for alias in node.names)


def test_every_module_has_a_layer():
    found = {p.relative_to(PACKAGE).with_suffix("").as_posix().replace("/", ".")
             for p in PACKAGE.rglob("*.py")}
    found -= {"__init__", "__main__"} | {f"{pkg}.__init__" for pkg in LAYERS if pkg}
    assert found == set(ORDER)


def test_every_subpackage_says_what_it_owns():
    for pkg in (p for p in LAYERS if p):
        init = PACKAGE / pkg / "__init__.py"
        doc = ast.get_docstring(ast.parse(init.read_text()))
        assert doc and len(doc) > 80, f"lambda_search.{pkg} has no docstring saying what it owns"


def test_imports_go_one_way():
    for i, name in enumerate(ORDER):
        for imported in imports_of(module_path(name), name):
            if imported.startswith("."):
                target = imported[1:]
                if target in ("", "__version__"):  # the package's version
                    continue
                if target in LAYERS and target:  # a subpackage: its __init__
                    assert name.startswith(target + "."), f"{name} imports the package {target}"
                    continue
                assert target in ORDER[:i], f"{name} imports {target}, which comes after it"
            if name in OPTUNA_FREE:
                assert imported != "optuna", f"{name} must not import optuna"
            if name in TORCH_FREE:
                assert imported not in ("torch", "torchvision"), f"{name} must not import torch"


def test_only_the_store_adapter_calls_optunas_storage():
    """Studies and trials are read and written through ``Store``'s methods: no module but
    ``store.storage`` calls a method of Optuna's storage."""
    import re

    for name in ORDER:
        if name != "store.storage":
            calls = re.findall(r"\.storage\.\w+\(", module_path(name).read_text())
            assert not calls, f"{name} calls Optuna's storage directly: {calls}"


def test_subpackages_import_nothing_when_imported():
    """A subpackage's __init__ holds its docstring only (the CLI's its ``main``): importing
    ``lambda_search.nn.registry`` does not load the networks."""
    for pkg in (p for p in LAYERS if p and p != "cli"):
        assert not list(imports_of(PACKAGE / pkg / "__init__.py", f"{pkg}.__init__")), pkg


# Run in a fresh interpreter: the state of the process and the files around it before
# `import lambda_search`, then after it. The dependencies of pyproject.toml (but matplotlib) are
# imported first: what they do when imported is theirs, not counted (scikit-learn sets KMP_*
# variables, torch and scipy add warnings filters and loggers). torch's thread count is set to a
# value no default has, so that a package setting it shows.
IMPORT_EFFECTS = r'''
import faulthandler, gc, importlib.util, json, logging, os, signal, sys, threading, warnings

package = importlib.util.find_spec("lambda_search").submodule_search_locations[0]
roots = [os.getcwd(), os.environ["HOME"], os.environ["TMPDIR"], package]

def files():
    out = {}
    for root in roots:
        for folder, dirs, names in os.walk(root):
            dirs[:] = [d for d in dirs if d != "__pycache__"]
            for name in dirs + names:
                path = os.path.join(folder, name)
                out[path] = os.path.getsize(path) if os.path.isfile(path) else "folder"
    return out

def name(handler):
    if callable(handler):
        return getattr(handler, "__module__", "?") + "." + getattr(handler, "__qualname__", repr(handler))
    return repr(handler)

def loggers():
    out = {"": [logging.root.level, [type(h).__name__ for h in logging.root.handlers]]}
    for key, lg in sorted(logging.root.manager.loggerDict.items()):
        if isinstance(lg, logging.Logger) and (lg.handlers or lg.level or not lg.propagate or lg.disabled):
            out[key] = [lg.level, lg.propagate, lg.disabled, [type(h).__name__ for h in lg.handlers]]
    return out

def state():
    import torch
    return {
        "environment": dict(os.environ), "cwd": os.getcwd(), "sys.path": list(sys.path),
        "umask": os.umask(os.umask(0o22)),
        "logging": loggers(), "logging.disable": logging.root.manager.disable,
        "warnings filters": [[a, getattr(m, "pattern", m), c.__name__, getattr(mod, "pattern", mod), n]
                             for a, m, c, mod, n in warnings.filters],
        "signal handlers": {s.name: name(signal.getsignal(s)) for s in signal.valid_signals()
                            if isinstance(s, signal.Signals)},
        "excepthook": name(sys.excepthook), "threads": sorted(t.name for t in threading.enumerate()),
        "stdio": [type(f).__name__ for f in (sys.stdin, sys.stdout, sys.stderr)],
        "recursion limit": sys.getrecursionlimit(), "faulthandler": faulthandler.is_enabled(), "gc": gc.isenabled(),
        "torch threads": [torch.get_num_threads(), torch.get_num_interop_threads()],
        "torch defaults": [str(torch.get_default_dtype()), str(torch.get_default_device()), torch.is_grad_enabled(),
                           torch.is_anomaly_enabled(), torch.are_deterministic_algorithms_enabled(),
                           torch.get_float32_matmul_precision()],
        "torch backends": [torch.backends.cudnn.enabled, torch.backends.cudnn.benchmark,
                           torch.backends.cudnn.deterministic, torch.backends.cudnn.allow_tf32,
                           torch.backends.cuda.matmul.allow_tf32],
        "torch seed": [torch.initial_seed(), torch.get_rng_state().tolist()],
    }

import numpy, optuna, pandas, scipy, sklearn, torch, torchvision
torch.set_num_threads(3)
files_before, before = files(), state()
import lambda_search
files_after, after = files(), state()
def diff(a, b):  # of two dicts, only what differs
    return {k: [a.get(k), b.get(k)] for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}

changed = {k: diff(before[k], after[k]) if isinstance(before[k], dict) else [before[k], after[k]]
           for k in before if before[k] != after[k]}
changed_files = diff(files_before, files_after)
print(json.dumps({"package": package, "changed": changed, "files": changed_files,
                  "matplotlib": "matplotlib" in sys.modules}, default=str))
'''


@pytest.mark.slow
def test_import_has_no_side_effects(tmp_path):
    """Importing the package changes nothing outside it: no file or folder made (in the
    current folder, the home folder, the temporary folder, the package), no environment
    variable, logging handler or level, warnings filter, signal handler, thread, torch
    setting (threads, defaults, seed); and matplotlib (a drawing backend) is loaded only
    to draw."""
    folders = {name: tmp_path / name for name in ("cwd", "home", "tmp")}
    for folder in folders.values():
        folder.mkdir()
    env = {k: v for k, v in os.environ.items()
           if k not in ("XDG_CACHE_HOME", "XDG_CONFIG_HOME", "LAMBDA_SEARCH_CACHE", "TORCH_HOME", "MPLCONFIGDIR")}
    env.update(HOME=str(folders["home"]), TMPDIR=str(folders["tmp"]), PYTHONDONTWRITEBYTECODE="1")
    run = subprocess.run([sys.executable, "-c", IMPORT_EFFECTS], capture_output=True, text=True, env=env,
                         cwd=folders["cwd"], timeout=300)
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout.splitlines()[-1])
    assert Path(out["package"]).name == "lambda_search"
    assert out["files"] == {}, "importing lambda_search made or changed files"
    assert out["changed"] == {}, "importing lambda_search changed the state of the process"
    assert out["matplotlib"] is False


def test_only_the_cli_imports_bench():
    """Bench holds the reference pipeline (PIL, DataLoader) a worker never uses: no module
    imports it but the CLI's bench command (and the package's lazy ``__getattr__``), so
    neither the package nor a worker process loads it."""
    for name in ORDER:
        if name not in ("cli.commands", "bench.run"):
            assert ".bench.run" not in set(imports_of(module_path(name), name)), f"{name} imports bench.run"
    code = ("import sys, lambda_search, lambda_search.cli; loaded = 'lambda_search.bench.run' in sys.modules; "
            "lambda_search.run_bench; print(loaded, 'lambda_search.bench.run' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "True"]


def test_functions_and_modules_stay_short():
    """A function fits on a screen (60 lines; the parser's declaration excepted) and a module
    holds one idea (400 lines): past either, split by idea."""
    for path in PACKAGE.rglob("*.py"):
        source = path.read_text()
        assert len(source.splitlines()) <= 400, f"{path.name} has {len(source.splitlines())} lines"
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name != "build_parser":
                length = node.end_lineno - node.lineno + 1
                assert length <= 60, f"{path.name}: {node.name} has {length} lines"


def test_the_public_surface_is_at_most_35_names_each_documented():
    import lambda_search

    doc = lambda_search.__doc__
    assert len(lambda_search.__all__) <= 35
    for name in lambda_search.__all__:
        assert name in doc, f"{name} is public but not in the package's docstring"
        assert getattr(lambda_search, name) is not None
