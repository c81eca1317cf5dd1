"""What fixes the rounding of a training, how a study keeps it fixed, and what each fold records.

A float32 training amplifies rounding: after a few hundred SGD steps, two trainings whose
arithmetic differs in the last bit of one sum end whole images apart in validation accuracy.
On the CPU the arithmetic of a training is fixed by the number of threads (PyTorch's
reductions, BatchNorm's among them, split their sums by thread), SimAM's C kernel on or off
and the vector instructions it and PyTorch use, the pack size (a grouped convolution sums in
another order than a plain one), compile, dtype and autocast, and the torch version.

The study config fixes threads (``train.threads``), pack, compile, amp and channels last.
What a machine decides, SimAM's kernel and a pack size measured on a GPU, is *pinned*: the
first worker of a kind of device (cpu, cuda) proposes it and the study stores it; every
later worker of that kind uses it. Every fold records what it was trained under
(:func:`training_numerics`), so that a study whose folds were trained under more than one is
reported as such (:func:`distinct_numerics`): its lambdas are then not compared bit for bit.
"""

from __future__ import annotations

import json
import platform
from pathlib import Path

import torch

from ._kernels import cpu_kernel, kernel_isa
from ._train import Engine, TrainConfig

__all__ = ["training_numerics", "proposed_pin", "numerics_label", "distinct_numerics", "device_kind"]


def device_kind(device) -> str:
    """'cpu' or 'cuda' (the kind a study pins numerics for)."""
    return torch.device(device).type


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def training_numerics(engine: Engine, config: TrainConfig, pack: int) -> dict:
    """What a training on ``engine`` with ``config``, in a pack of ``pack``, rounds with: the
    record each fold stores (``threads`` and ``simam_kernel`` only on the CPU)."""
    cpu = engine.device.type == "cpu"
    kernel = (kernel_isa() if cpu_kernel() is not None else "off") if cpu else None
    return {
        "device": engine.device.type,
        "processor": _cpu_model() if cpu else torch.cuda.get_device_name(engine.device),
        "isa": torch.backends.cpu.get_cpu_capability().lower() if cpu else None,  # PyTorch's vector code
        "dtype": str(engine.dtype).removeprefix("torch."),
        "autocast": "bfloat16" if engine.amp else None,
        "threads": config.threads if cpu else None,
        "simam_kernel": kernel,
        "pack": pack,
        "compile": engine.compile,
        "channels_last": engine.channels_last,
        "torch": torch.__version__,
    }


def proposed_pin(device: str, packs: dict[str, int]) -> dict:
    """The pin a first worker of ``device``'s kind proposes: SimAM's CPU kernel on where it
    can be had (None off the CPU) and the pack size of each network ("simam", "none")."""
    cpu = device_kind(device) == "cpu"
    return {"simam_kernel": (cpu_kernel() is not None) if cpu else None, "packs": dict(packs)}


def numerics_label(numerics: dict | None) -> str:
    """One line: where and how a fold was trained."""
    if not numerics:
        return "not recorded (trained before lambda_search recorded numerics)"
    n = numerics
    parts = [f"{n['device']} ({n['processor']}" + (f", {n['isa']})" if n.get("isa") else ")"), n["dtype"]]
    if n.get("autocast"):
        parts.append(f"{n['autocast']} autocast")
    if n.get("threads") is not None:
        parts.append(f"{n['threads']} thread{'s' if n['threads'] != 1 else ''}")
    if n.get("simam_kernel") is not None:
        parts.append(f"SimAM kernel {n['simam_kernel']}")
    parts += [f"pack {n['pack']}"] + (["compiled"] if n.get("compile") else []) + [f"torch {n['torch']}"]
    return ", ".join(parts)


def distinct_numerics(records) -> list[dict]:
    """The distinct numerics of fold ``records`` (dicts with a "numerics" entry; a record
    without one counts as None), in order of first appearance: [{"numerics", "folds"}]."""
    seen: dict[str, dict] = {}
    for record in records:
        n = record.get("numerics")
        key = json.dumps(n, sort_keys=True)
        if key not in seen:
            seen[key] = {"numerics": n, "folds": 0}
        seen[key]["folds"] += 1
    return list(seen.values())
