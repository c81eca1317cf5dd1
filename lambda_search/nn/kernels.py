"""The CPU kernel of SimAM (``simam_cpu.c``): built once per machine with the C compiler
that torch.compile uses on the CPU, cached, loaded with ctypes.

Where it cannot be built (no compiler, a read-only cache, ``LAMBDA_SEARCH_KERNELS=0``),
:func:`cpu_kernel` returns None, warns once, and SimAM runs as plain PyTorch operations:
slower, the same numbers to float32 rounding (not the same bits: a study pins which of the
two its trainings use, with :func:`use_kernels`).
"""

from __future__ import annotations

import contextlib
import contextvars
import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

__all__ = [
    "cpu_kernel",
    "cpu_model",
    "kernel_build",
    "kernel_cache_dir",
    "kernel_isa",
    "kernels_enabled",
    "use_kernels",
    "KERNELS_ENV",
    "CACHE_ENV",
]

KERNELS_ENV = "LAMBDA_SEARCH_KERNELS"  # "0": never build or load, use PyTorch operations
CACHE_ENV = "LAMBDA_SEARCH_CACHE"  # where built kernels are kept (default ~/.cache/lambda_search)
SOURCE = Path(__file__).with_name("simam_cpu.c")
# x86: the widest vectors the processor has (compilers default to 256 bits on AVX-512 parts;
# 512 makes the kernel about 20 % faster on a Xeon), ignored without AVX-512
_WIDE = ("-mprefer-vector-width=512",) if platform.machine().lower() in ("x86_64", "amd64") else ()
# use_kernels(): on or off within a block (a study's pin), whatever the environment says
_SWITCH: contextvars.ContextVar[bool | None] = contextvars.ContextVar("lambda_search_kernels", default=None)
FLAGS = ("-O3", "-march=native", *_WIDE, "-fopenmp", "-fno-math-errno", "-fno-trapping-math", "-shared", "-fPIC")


def kernel_cache_dir() -> Path:
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "lambda_search"


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _cpuinfo() -> list[str]:
    try:
        return Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return []


def _cpu_signature() -> str:
    """What -march=native depends on: the processor model and its flags."""
    lines = _cpuinfo()
    if not lines:
        return platform.processor() or platform.machine()
    wanted = [ln for ln in lines if ln.startswith(("model name", "flags", "Features", "CPU part"))]
    return "\n".join(sorted(set(wanted)))


def cpu_model() -> str:
    """The processor's model name (/proc/cpuinfo), or what the platform says."""
    for line in _cpuinfo():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _build(compiler: str) -> Path:
    source = SOURCE.read_bytes()
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=60).stdout
    key = hashlib.sha256(b"\0".join([source, version.encode(), _cpu_signature().encode(),
                                     " ".join(FLAGS).encode(), sys.platform.encode()])).hexdigest()[:20]
    target = kernel_cache_dir() / f"simam_cpu_{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # build beside the target and rename: concurrent workers never load a half-written file
    fd, tmp = tempfile.mkstemp(prefix=target.name + ".", suffix=".tmp", dir=target.parent)
    os.close(fd)
    try:
        result = subprocess.run([compiler, *FLAGS, "-o", tmp, str(SOURCE)], capture_output=True, text=True,
                                timeout=300)
        if result.returncode != 0:
            raise RuntimeError(result.stderr.strip().splitlines()[-1] if result.stderr.strip() else "compiler failed")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def kernels_enabled() -> bool:
    """Whether SimAM may use the CPU kernel here: as :func:`use_kernels` says within its
    block, else unless ``LAMBDA_SEARCH_KERNELS=0``."""
    switch = _SWITCH.get()
    if switch is not None:
        return switch
    return os.environ.get(KERNELS_ENV, "1").strip().lower() not in ("0", "false", "no", "off")


@contextlib.contextmanager
def use_kernels(enabled: bool | None):
    """Within the block the CPU kernel is on (where it can be built) or off; None leaves it
    as it is. A study pins this at creation, so that every training of it rounds alike."""
    token = _SWITCH.set(enabled) if enabled is not None else None
    try:
        yield
    finally:
        if token is not None:
            _SWITCH.reset(token)


def kernel_isa() -> str:
    """The vector instructions the kernel is built for (-march=native): 'avx512' (512-bit
    vectors), 'avx2', or the machine's name elsewhere."""
    flags = set(_cpu_signature().split())
    if "avx512f" in flags:
        return "avx512"
    return "avx2" if "avx2" in flags else platform.machine().lower()


def kernel_build(lib: ctypes.CDLL) -> str:
    """What the loaded kernel ``lib`` was built from: the first digits of the hash of its
    source, compiler version, processor and flags (its file name in the cache)."""
    return Path(lib._name).stem.rsplit("_", 1)[-1][:12]


def cpu_kernel() -> ctypes.CDLL | None:
    """The loaded kernel library, or None where it is switched off or cannot be had (a
    warning says why, once)."""
    return _load() if kernels_enabled() else None


@functools.lru_cache(maxsize=1)
def _load() -> ctypes.CDLL | None:
    if sys.platform == "win32":
        return None
    compiler = _compiler()
    if compiler is None:
        warnings.warn("no C compiler found (set CC): SimAM runs as plain PyTorch operations on the CPU, "
                      "which is slower", RuntimeWarning, stacklevel=2)
        return None
    try:
        path = _build(compiler)
        lib = ctypes.CDLL(str(path))
    except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
        warnings.warn(f"could not build SimAM's CPU kernel ({exc}): SimAM runs as plain PyTorch operations "
                      f"on the CPU, which is slower", RuntimeWarning, stacklevel=2)
        return None
    p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    lib.simam_forward.argtypes = [p, p, p, p, p, i64, i64, i64, i32, i32]
    lib.simam_forward.restype = None
    lib.simam_backward.argtypes = [p, p, p, p, p, i64, i64, i64, i32, i32]
    lib.simam_backward.restype = None
    f64 = ctypes.c_double
    lib.simbn_forward.argtypes = [p] * 9 + [f64, f64, p, p, i64, i64, i64, i32]
    lib.simbn_forward.restype = None
    lib.simbn_backward_full.argtypes = [p] * 10 + [i64, i64, i64, i32]
    lib.simbn_backward_full.restype = None
    return lib
