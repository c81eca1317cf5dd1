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
reported as such (:func:`lambda_search.points.mixed_folds`): its lambdas are then not compared bit for bit.

On a GPU the same numerics give the same numbers within float noise, not the same bits:
cuDNN picks its algorithms by timing them, and some reduce with atomics.
"""

from __future__ import annotations

import torch

from ..config import TrainConfig
from ..nn.kernels import cpu_kernel, cpu_model, kernel_build, kernel_isa
from .engine import Engine

__all__ = ["training_numerics", "proposed_pin", "device_kind"]


def device_kind(device) -> str:
    """'cpu' or 'cuda' (the kind a study pins numerics for)."""
    return torch.device(device).type


def training_numerics(engine: Engine, config: TrainConfig, pack: int) -> dict:
    """What a training on ``engine`` with ``config``, in a pack of ``pack``, rounds with: the
    record each fold stores. ``threads`` and ``simam_kernel`` only on the CPU; SimAM's kernel
    is "off" where SimAM runs as the PyTorch formula (switched off, not built, or compiled);
    a network without SimAM carries its worker's setting all the same."""
    device = engine.device
    cpu = device.type == "cpu"
    lib = cpu_kernel() if cpu and not engine.compile else None
    return {
        "device": device.type,
        "processor": cpu_model() if cpu else (torch.cuda.get_device_name(device) if device.type == "cuda"
                                               else str(device)),
        "isa": torch.backends.cpu.get_cpu_capability().lower() if cpu else None,  # PyTorch's vector code
        "dtype": str(engine.dtype).removeprefix("torch."),
        "autocast": "bfloat16" if engine.amp else None,
        "threads": config.threads if cpu else None,
        "simam_kernel": (kernel_isa() if lib is not None else "off") if cpu else None,
        "kernel_build": kernel_build(lib) if lib is not None else None,
        "pack": pack,
        "compile": engine.compile,
        "channels_last": engine.channels_last,
        "torch": str(torch.__version__),
    }


def proposed_pin(device: str, packs: dict[str, int]) -> dict:
    """The pin a first worker of ``device``'s kind proposes: SimAM's CPU kernel on where it
    can be had (None off the CPU) and the pack size of each network ("simam", "none")."""
    cpu = device_kind(device) == "cpu"
    return {"simam_kernel": (cpu_kernel() is not None) if cpu else None, "packs": dict(packs)}
