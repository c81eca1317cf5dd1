import os
import sys
import time
from pathlib import Path

import pytest

TINY = """
[study]
name = "{name}"

[search]
lambdas = {lambdas}
baseline = {baseline}
workers = 1                    # in this process: tests that stop a search in-process need it

[data]
dataset = "synthetic"
folds = 2
seed = 0

[data.options]
num_samples = {samples}
num_classes = 3
image_size = 8
noise = 60.0

[model]
name = "resnet20"

[train]
epochs = {epochs}
batch_size = 8
lr = 0.05
checkpoint_every_seconds = {ckpt_seconds}
"""


def write_config(folder, name="tiny", lambdas="[1e-4, 1e-1]", baseline="false", samples=48, epochs=2,
                 ckpt_seconds=120.0):
    """Write a tiny study config (synthetic 8 px data, 3 classes, 2 folds); return its path."""
    path = Path(folder) / f"{name}.toml"
    path.write_text(TINY.format(name=name, lambdas=lambdas, baseline=baseline, samples=samples, epochs=epochs,
                                ckpt_seconds=ckpt_seconds))
    return path


@pytest.fixture
def tiny_config(tmp_path):
    def make(folder=None, **kw):
        return write_config(folder or tmp_path, **kw)

    return make


@pytest.fixture
def cli_env():
    """Environment for lambda-search subprocesses: few threads, no GPU."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "PYTHONUNBUFFERED": "1"}


SCRIPT = Path(sys.executable).parent / "lambda-search"


def poll(predicate, timeout=120, every=0.05) -> bool:
    """Whether ``predicate()`` came true within ``timeout`` seconds, asked every ``every``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(every)
    return False
