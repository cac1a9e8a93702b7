"""What the Triton code of both ops shares: head-dim and dtype limits, block-size rounding, the interpreter and
kernel-mode checks of the dispatch, and autotuning (``ZOO_OPS_AUTOTUNE``).

Imports no Triton at module level: ``import zoo.ops`` works where Triton is absent (the dispatch then says so).
"""

from __future__ import annotations

import os
import sys
from typing import Any

import torch

__all__ = [
    "AUTOTUNE_ENV",
    "MAX_HEAD_DIM",
    "TRITON_DTYPES",
    "auto_check_cuda",
    "autotune_enabled",
    "check_triton",
    "interpreter_enabled",
    "launcher",
    "next_pow2",
    "precision",
]

TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 128
AUTOTUNE_ENV = "ZOO_OPS_AUTOTUNE"
_AUTOTUNE_CONFIGS = ((2, 2), (4, 2), (4, 3), (8, 2))  # (num_warps, num_stages)


def next_pow2(n: int) -> int:
    """Smallest power of two ``>= n`` (1 for ``n <= 1``): Triton block shapes are powers of two."""
    return 1 << (max(1, n) - 1).bit_length()


def precision(dtype: torch.dtype) -> str:
    """``tl.dot`` input precision: fp32 inputs keep fp32 accuracy (no TF32)."""
    return "ieee" if dtype == torch.float32 else "tf32"


def interpreter_enabled() -> bool:
    """True when Triton kernels run on CPU tensors through the interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _triton_import_error() -> str | None:
    try:
        import triton  # noqa: F401
    except ImportError as err:  # pragma: no cover - triton ships with CUDA builds of torch
        return f"triton is not importable ({err})"
    return None


def _kernels_mode_mismatch(kernels_module: str, device: torch.device) -> str | None:
    """Reason the already-defined kernels of ``kernels_module`` cannot run on ``device`` (compiled vs interpreted).

    ``@triton.jit`` reads ``TRITON_INTERPRET`` once, when the kernel module is first imported; the module records
    that in its ``INTERPRETED`` bool, read here (a plain bool: torch.compile traces this without a Triton object).
    """
    module = sys.modules.get(kernels_module)
    if module is None:
        return None
    if device.type == "cpu" and not module.INTERPRETED:
        return "the Triton kernels were first used with TRITON_INTERPRET unset, so they compile for the GPU only"
    if device.type == "cuda" and module.INTERPRETED:
        return "the Triton kernels were defined under TRITON_INTERPRET=1 (interpreter, CPU tensors only)"
    return None


def check_triton(problem: Any, kernels_module: str) -> str | None:
    """None if Triton kernels can run ``problem`` (its ``device``, ``dtype``, ``d_qk``, ``d_v``), else why not.

    ``kernels_module`` names the op's kernel module (``zoo.ops._routed_kernels``), whose definition mode counts.
    """
    reason = _triton_import_error()
    if reason:
        return reason
    if problem.device.type == "cpu":
        if not interpreter_enabled():
            return "tensors are on CPU; Triton needs CUDA (or TRITON_INTERPRET=1 to interpret the kernels, for tests)"
    elif problem.device.type != "cuda":
        return f"Triton kernels run on CUDA only, got device {problem.device}"
    reason = _kernels_mode_mismatch(kernels_module, problem.device)
    if reason:
        return reason
    if problem.dtype not in TRITON_DTYPES:
        return f"dtype {problem.dtype} is not supported (float16, bfloat16, float32)"
    if max(problem.d_qk, problem.d_v) > MAX_HEAD_DIM:
        return f"head dims d_qk={problem.d_qk}, d_v={problem.d_v} exceed {MAX_HEAD_DIM}"
    return None


def auto_check_cuda(problem: Any) -> str | None:
    """``auto`` picks a Triton backend on CUDA only: the interpreter is correct but slow."""
    if problem.device.type != "cuda":
        return "the Triton interpreter on CPU is for tests (slow); force backend='triton' to use it"
    return None


# ------------------------------------------------------------------------------------------- autotuning


def autotune_enabled() -> bool:
    """``ZOO_OPS_AUTOTUNE``: autotune compiled kernels over warps x stages (default on; ``0`` turns it off).

    Each new autotune key compiles every config once (minutes for a short test run), hence the switch. Read at
    every launch, not frozen at import and not an argument: it changes launch configs, not what is computed, and
    belongs to the machine and the run (``benchmarks/gpu_check.sh`` sets it), not to a call site.
    """
    return os.environ.get(AUTOTUNE_ENV, "1") not in ("0", "")


_AUTOTUNED: dict[tuple[int, tuple[str, ...]], Any] = {}  # one autotuner (and its timing cache) per kernel


def launcher(kernel: Any, key: tuple[str, ...], num_warps: int) -> tuple[Any, dict[str, int]]:
    """``(kernel to launch, extra launch options)``: autotuned over warps x stages on the constexprs ``key`` when
    :func:`autotune_enabled` and the kernel is compiled, else ``kernel`` itself with ``num_warps``.

    Re-running a config while tuning is harmless: the kernels store their outputs, they never accumulate into them.
    The interpreter has nothing to tune.
    """
    if not autotune_enabled() or type(kernel).__name__ == "InterpretedFunction":
        return kernel, {"num_warps": num_warps}
    cache_key = (id(kernel), tuple(key))
    if cache_key not in _AUTOTUNED:
        import triton

        configs = [triton.Config({}, num_warps=w, num_stages=s) for w, s in _AUTOTUNE_CONFIGS]
        _AUTOTUNED[cache_key] = triton.autotune(configs, key=list(key))(kernel)
    return _AUTOTUNED[cache_key], {}
