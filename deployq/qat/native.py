"""The fake quantizers' CPU kernels in C (``kernels.c``), compiled at first use with the machine's C
compiler and called through ctypes.

Why not torch.compile on the CPU: a QAT model calls its ~200 quantizers twice per step, and each
call of a torch.compile'd function pays dynamo's frame evaluation and guards (~150 µs) and
inductor's wrapper, more than the fused arithmetic itself on a small batch. A C function called
with the tensors' data pointers costs a few µs, and compiles in a fraction of a second with no
dependency beyond a C compiler with OpenMP (what inductor needs as well).

The shared library is cached under ``$XDG_CACHE_HOME/deployq/kernels`` (``~/.cache`` by default),
named by a hash of the source, the flags and the compiler, and written there atomically.
:func:`load` returns None, with the reason in :data:`FAILURE`, where it cannot be built; the
caller then runs the eager torch functions.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
from pathlib import Path
from typing import Optional

import torch

from deployq.core.files import atomic_path

__all__ = ["Kernels", "load", "FAILURE"]

SOURCE = Path(__file__).with_name("kernels.c")
FAILURE: Optional[str] = None  # why the kernels could not be built, once tried


def _flag_sets() -> list[list[str]]:
    """The compiler flags to try, best first: optimization without fast math (the forward must equal
    the eager torch forward bit for bit), OpenMP threads and vector instructions by what torch found
    on this CPU; then without OpenMP (Apple's clang has none: one thread), then without both (an
    older compiler that does not know the x86-64 levels)."""
    base = ["-O3", "-fPIC", "-shared", "-ffp-contract=off", "-fno-fast-math", "-std=c11", "-Wno-unknown-pragmas"]
    march = {"AVX512": ["-march=x86-64-v4"], "AVX2": ["-march=x86-64-v3"]}.get(
        torch.backends.cpu.get_cpu_capability(), [])
    return [base + ["-fopenmp"] + march, base + march, base] if march else [base + ["-fopenmp"], base]


def _cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "deployq" / "kernels"


def _build(compiler: str, flags: list[str], target: Path) -> None:
    """Compile SOURCE into `target` through a temporary file renamed into place (deployq's atomic
    outputs), so a concurrent or interrupted build never leaves a half-written library."""
    with atomic_path(target) as tmp:
        result = subprocess.run([compiler, *flags, str(SOURCE), "-o", tmp, "-lm"], capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"{compiler} failed: {result.stderr.strip()[:400]}")


def _pointer(t: Optional[torch.Tensor]) -> Optional[int]:
    return None if t is None else t.data_ptr()


class Kernels:
    """The loaded library: :meth:`forward` and :meth:`gradients` of float32 CPU tensors: x grouped
    as (outer, channels, inner); the stored scale (exp'd where it is a log scale), floor and zero
    point with one value per channel (see kernels.c and :class:`deployq.qat.fake_quant.Rule`)."""

    def __init__(self, library: ctypes.CDLL) -> None:
        p, f, i64, i32 = ctypes.c_void_p, ctypes.c_float, ctypes.c_int64, ctypes.c_int
        self._forward = library.deployq_forward
        self._forward.argtypes = [p, p, p, p, i32, f, f, p, i64, i64, i64, i32]
        self._forward.restype = i32
        self._backward = library.deployq_backward
        self._backward.argtypes = [p, p, p, p, p, i32, i32, f, f, f, f, f, f, i32, p, p, p, p, i64, i64, i64, i32]
        self._backward.restype = i32

    def forward(self, x: torch.Tensor, dims: tuple[int, int, int], scale: torch.Tensor, floor: Optional[torch.Tensor],
                zero_point: torch.Tensor, learned_zero_point: bool, qmin: float, qmax: float) -> torch.Tensor:
        """(clamp(rint(x/s) + zp, qmin, qmax) − zp)·s, s = max(scale, floor), zp = zero_point or, when
        learned, clamp(rint(zero_point), qmin, qmax); x read as `dims` (outer, channels, inner).
        The per-channel tensors are the quantizer's own 1-D ones, contiguous."""
        x = x.contiguous()
        y = torch.empty_like(x, memory_format=torch.contiguous_format)
        if self._forward(x.data_ptr(), scale.data_ptr(), _pointer(floor), zero_point.data_ptr(), learned_zero_point,
                         qmin, qmax, y.data_ptr(), *dims, torch.get_num_threads()):
            raise MemoryError("deployq: out of memory in a fake quantizer's forward")
        return y

    def gradients(self, grad: torch.Tensor, x: torch.Tensor, dims: tuple[int, int, int], scale: torch.Tensor,
                  floor: Optional[torch.Tensor], zero_point: torch.Tensor, learned_zero_point: bool,
                  alpha: Optional[float], alpha_range: tuple[float, float], qmin: float, qmax: float, g: float,
                  log_scale: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """∂L/∂x (x's shape); the gradients of the stored scale (of log s, with `log_scale`) and zero
        point (their shapes; LSQ's factor `g` applied); of DSQ's α (a 0-d tensor; 0 with the
        straight-through gradient, `alpha` None), which is clamped to `alpha_range`."""
        grad, x = grad.contiguous(), x.contiguous()
        grad_x = torch.empty_like(x, memory_format=torch.contiguous_format)
        grad_scale, grad_zero_point = torch.empty_like(scale), torch.empty_like(zero_point)
        grad_alpha = torch.empty((), dtype=torch.float32)
        if self._backward(grad.data_ptr(), x.data_ptr(), scale.data_ptr(), _pointer(floor), zero_point.data_ptr(),
                          learned_zero_point, alpha is not None, 0.0 if alpha is None else alpha, *alpha_range,
                          qmin, qmax, g,
                          log_scale, grad_x.data_ptr(), grad_scale.data_ptr(), grad_zero_point.data_ptr(),
                          grad_alpha.data_ptr(), *dims, torch.get_num_threads()):
            raise MemoryError("deployq: out of memory in a fake quantizer's backward")
        return grad_x, grad_scale, grad_zero_point, grad_alpha


@functools.lru_cache(maxsize=1)
def load() -> Optional[Kernels]:
    """The compiled kernels, built on first use (a fraction of a second) and then read from the
    cache; None where no C compiler with OpenMP works here (:data:`FAILURE` says why). Tried
    once per process."""
    global FAILURE
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or "cc"
    failures = []
    try:
        source = SOURCE.read_text()
    except OSError as err:  # a packaging mistake: kernels.c left out of the wheel
        FAILURE = f"{type(err).__name__}: {err}"
        return None
    for flags in _flag_sets():
        key = hashlib.sha256("\0".join([source, compiler, *flags]).encode()).hexdigest()[:16]
        target = _cache_dir() / f"deployq_kernels_{key}.so"
        try:
            if not target.is_file():
                _build(compiler, flags, target)
            return Kernels(ctypes.CDLL(str(target)))
        except (OSError, RuntimeError) as err:
            failures.append(f"{type(err).__name__}: {err}")
    FAILURE = failures[0]
    return None
