"""Shared helpers for the ops tests: Triton kernels run on CPU through the interpreter when there is no GPU."""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():  # must happen before any Triton kernel is defined
    os.environ.setdefault("TRITON_INTERPRET", "1")
# GPU tests check correctness: autotuning would compile every config for every shape (minutes); the benchmark tunes
os.environ.setdefault("ZOO_OPS_AUTOTUNE", "0")
