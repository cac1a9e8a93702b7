"""ZOO_OPS_AUTOTUNE is read at every launch (no module setting): compiled kernels are autotuned unless it is 0,
interpreted kernels never are."""

from __future__ import annotations

import pytest

triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")

from triton.runtime.jit import JITFunction  # noqa: E402

from zoo.ops import _triton  # noqa: E402


def _copy(X, Y, BLOCK: tl.constexpr):
    offsets = tl.arange(0, BLOCK)
    tl.store(Y + offsets, tl.load(X + offsets))


def test_autotune_env_is_read_per_launch(monkeypatch):
    compiled = JITFunction(_copy)  # a compiled-mode kernel object (nothing is compiled until it is launched)
    monkeypatch.setenv("ZOO_OPS_AUTOTUNE", "1")
    tuned, options = _triton.launcher(compiled, ("BLOCK",), 4)
    assert type(tuned).__name__ == "Autotuner" and options == {}
    assert _triton.launcher(compiled, ("BLOCK",), 4)[0] is tuned  # one autotuner (one timing cache) per kernel
    monkeypatch.setenv("ZOO_OPS_AUTOTUNE", "0")
    assert _triton.launcher(compiled, ("BLOCK",), 4) == (compiled, {"num_warps": 4})
    monkeypatch.delenv("ZOO_OPS_AUTOTUNE")
    assert _triton.autotune_enabled()  # on by default


def test_interpreted_kernels_are_never_tuned(monkeypatch):
    interpreted = type("InterpretedFunction", (), {})()  # what @triton.jit gives under TRITON_INTERPRET=1
    monkeypatch.setenv("ZOO_OPS_AUTOTUNE", "1")
    assert _triton.launcher(interpreted, ("BLOCK",), 2) == (interpreted, {"num_warps": 2})
