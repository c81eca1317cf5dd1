"""Reading a study never needs the training stack: with torch and torchvision unimportable,
``import lambda_search``, the reading commands (status, studies, select, plot, export) and the
notebook's functions work on a finished study."""

import json
import subprocess
import sys

import pytest

import lambda_search as ls

# torch and torchvision made unimportable (as on a laptop without them), then the reading
# commands and functions, each in this one process; the script prints what it found.
NO_TORCH = r'''
import importlib.abc, json, sys

class NotInstalled(importlib.abc.MetaPathFinder):  # as if torch and torchvision were not installed
    def find_spec(self, fullname, path=None, target=None):
        if fullname.split(".")[0] in ("torch", "torchvision"):
            raise ModuleNotFoundError(f"No module named {fullname!r}", name=fullname)

sys.meta_path.insert(0, NotInstalled())
url, name, out = sys.argv[1:4]
import lambda_search as ls
from lambda_search.cli import main
codes = {}
for args in (["status"], ["status", "--json"], ["studies"], ["select"], ["select", "--json"],
             ["plot", "--output", out + "/figure4.png"], ["export", "--output", out + "/table.csv"]):
    codes[" ".join(args)] = main(args[:1] + ["--storage", url] + (["--study", name] if args[0] != "studies" else [])
                                 + args[1:])
status = ls.study_status(ls.open_store(url), name)
frame = ls.results_frame(status)
found = {"codes": codes, "points": len(ls.cv_results(status)["params"]), "rows": len(frame),
         "folds": len(ls.folds_frame(status)), "figure4": sorted(ls.figure4_data(status)),
         "evaluation": ls.read_evaluation(ls.open_store(url), name), "lambda": ls.format_lambda(1e-3),
         "loaded": sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "torchvision"))}
print("FOUND " + json.dumps(found, default=str))
'''


@pytest.mark.slow
def test_reading_a_study_imports_no_torch(tiny_config, tmp_path, capsys):
    config = ls.load_config(tiny_config(baseline="true"))
    ls.run_search(config, log=lambda s: None)
    url, name = config.study.storage, config.study.name
    run = subprocess.run([sys.executable, "-c", NO_TORCH, url, name, str(tmp_path)], capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    found = json.loads(next(line for line in run.stdout.splitlines() if line.startswith("FOUND "))[6:])
    assert found["codes"] == {k: 0 for k in found["codes"]}, run.stderr[-2000:]
    assert found["loaded"] == []
    assert found["points"] == 2 and found["rows"] == 3 and found["folds"] == 6
    assert found["figure4"] and found["lambda"] == "1e-03" and found["evaluation"] is None
    assert (tmp_path / "figure4.png").stat().st_size > 0 and (tmp_path / "table.csv").stat().st_size > 0


def test_the_package_imports_lazily():
    """``import lambda_search`` loads no training stack and no Optuna; each public name comes
    from its module on first use."""
    code = ("import sys; import lambda_search as ls; before = sorted(m for m in ('torch', 'optuna', 'pandas') "
            "if m in sys.modules); ls.format_lambda; print(before, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["[]", "False"]
    for name in ls.__all__:
        assert name in dir(ls) and getattr(ls, name) is not None
