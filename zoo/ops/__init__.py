"""Attention ops with interchangeable backends: PyTorch references, a lean PyTorch path, Triton kernels, Flex.

Public functions (models call only these):

* :func:`region_routing` -- top-k region routing of bi-level routing attention (BiFormer).
* :func:`routed_attention` -- every query of a region attends to all tokens of its routed regions.
* :func:`halo_attention` -- blocked local attention with halos and factorised relative positions (HaloNet).

Backend selection (``backend=`` argument, ``ZOO_OPS_BACKEND`` environment variable, ``"auto"``) is described in
:mod:`zoo.ops._dispatch`; :func:`available_backends` lists the backends per op, :func:`backend_support` says which
of them accept given inputs and why the others do not, and :func:`select_routed_backend` /
:func:`select_halo_backend` name the one a call would use.

Layout: one module per op (:mod:`zoo.ops.routed`, :mod:`zoo.ops.halo`) holds its public function, its checks and
its backend registrations; each backend's implementation is in its own module (``dense``, ``lean``, ``flex``,
``routed_triton``, ``halo_triton`` and their ``_*_kernels``); :mod:`zoo.ops.reference` defines every op.
"""

from __future__ import annotations

from ._dispatch import ENV_VAR, BackendUnavailableError, available_backends, backend_reasons
from .halo import halo_attention, halo_problem, select_halo_backend
from .routed import region_routing, routed_attention, select_routed_backend, validate_routed

__all__ = [
    "ENV_VAR",
    "BackendUnavailableError",
    "available_backends",
    "backend_support",
    "halo_attention",
    "region_routing",
    "routed_attention",
    "select_halo_backend",
    "select_routed_backend",
]


def backend_support(op: str, *args, **kwargs) -> dict[str, str | None]:
    """For ``op`` called with ``args``/``kwargs``: each backend -> ``None`` if it supports them, else why not.

    Example: ``zoo.ops.backend_support("routed_attention", q, k, v, idx, 2, 0.125)``.
    """
    kwargs.pop("backend", None)
    if op == "routed_attention":
        problem = validate_routed(*args, **kwargs)
    elif op == "halo_attention":
        problem = halo_problem(*args, **kwargs)
    else:
        raise KeyError(f"unknown op {op!r}; known ops: {sorted(available_backends())}")
    return backend_reasons(op, problem)
