"""Backend selection for the ops in ``zoo.ops``.

Every op has an ordered list of :class:`Backend` objects. Each backend states, for a described problem,
whether it can run it (``check``) and whether ``backend="auto"`` may pick it (``auto_check``: a backend
can be correct but not meant for automatic use, e.g. the Triton interpreter on CPU). The order of the
list is the auto preference order.

Selection, in priority order:

1. the ``backend=`` argument when it is not ``"auto"``;
2. the ``ZOO_OPS_BACKEND`` environment variable: a comma-separated list of ``name`` or ``op=name``
   entries, e.g. ``ZOO_OPS_BACKEND=torch`` or ``ZOO_OPS_BACKEND=routed_attention=torch_lean,halo_attention=torch``.
   An ``op=name`` entry applies to that op only; a plain ``name`` applies to every op that has a backend of
   that name (ops without it keep ``auto``). A name no op has, a name the given op lacks, or an op without
   backends is an error listing the known names (checked for the whole variable at every selection);
3. ``auto``: the first backend in preference order whose ``check`` and ``auto_check`` both pass.

A forced backend (1 or 2) that does not support the inputs raises :class:`BackendUnavailableError`
listing every backend of the op with its reason, as does ``auto`` when nothing fits.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = [
    "ENV_VAR",
    "Backend",
    "BackendUnavailableError",
    "available_backends",
    "backend_reasons",
    "register_backend",
    "select_backend",
]

ENV_VAR = "ZOO_OPS_BACKEND"


class BackendUnavailableError(RuntimeError):
    """No backend (or not the requested one) supports the given inputs."""


@dataclass(frozen=True)
class Backend:
    """One implementation of an op.

    Attributes:
        name: short name used by ``backend=`` and ``ZOO_OPS_BACKEND`` ("torch", "triton", ...).
        fn: the implementation; called with the op's normalised arguments.
        check: ``problem -> None`` if supported, else a one-line reason why not.
        auto_check: extra condition for automatic selection; ``problem -> None`` or a reason.
        description: one line for ``available_backends()``.
    """

    name: str
    fn: Callable[..., Any]
    check: Callable[[Any], str | None]
    auto_check: Callable[[Any], str | None] = lambda problem: None
    description: str = ""


_REGISTRY: dict[str, list[Backend]] = {}


def register_backend(op: str, backend: Backend) -> None:
    """Append ``backend`` to ``op``'s preference list (replacing one of the same name in place)."""
    backends = _REGISTRY.setdefault(op, [])
    for i, existing in enumerate(backends):
        if existing.name == backend.name:
            backends[i] = backend
            return
    backends.append(backend)


def available_backends(op: str | None = None) -> dict[str, list[str]] | list[str]:
    """Backend names in auto-preference order: for one op (a list) or for every op (a dict)."""
    if op is not None:
        if op not in _REGISTRY:
            raise KeyError(f"unknown op {op!r}; known ops: {sorted(_REGISTRY)}")
        return [b.name for b in _REGISTRY[op]]
    return {name: [b.name for b in backends] for name, backends in _REGISTRY.items()}


def backend_reasons(op: str, problem: Any, auto: bool = False) -> dict[str, str | None]:
    """For each backend of ``op``: ``None`` if it supports ``problem``, else the reason it does not."""
    reasons: dict[str, str | None] = {}
    for b in _REGISTRY[op]:
        reason = b.check(problem)
        if reason is None and auto:
            reason = b.auto_check(problem)
        reasons[b.name] = reason
    return reasons


def _env_entries(raw: str) -> list[tuple[str | None, str]]:
    """``ZOO_OPS_BACKEND`` as ``(op or None, name)`` pairs, every op and name checked against the registry.

    The whole variable is checked whichever op asks, so a typo is an error on the first call, not a silent
    ``auto`` for the ops it was meant for.
    """
    known = {b.name for backends in _REGISTRY.values() for b in backends}
    entries: list[tuple[str | None, str]] = []
    for entry in (e.strip() for e in raw.split(",")):
        if not entry:
            continue
        if "=" in entry:
            entry_op, name = (s.strip() for s in entry.split("=", 1))
            if entry_op not in _REGISTRY:
                raise BackendUnavailableError(
                    f"{ENV_VAR}={raw!r} names op {entry_op!r}, which has no backends; ops: {sorted(_REGISTRY)} "
                    f"(e.g. {ENV_VAR}=routed_attention=torch)"
                )
            names = {b.name for b in _REGISTRY[entry_op]}
            if name != "auto" and name not in names:
                raise BackendUnavailableError(
                    f"{ENV_VAR} asks for backend {name!r} for {entry_op}; {entry_op} has backends {sorted(names)} "
                    "(or 'auto')"
                )
            entries.append((entry_op, name))
        else:
            if entry != "auto" and entry not in known:
                raise BackendUnavailableError(
                    f"{ENV_VAR}={raw!r}: unknown backend {entry!r}; known backends: {sorted(known)} (or 'auto'), "
                    f"per op: {available_backends()}"
                )
            entries.append((None, entry))
    return entries


def _env_choice(op: str) -> str | None:
    raw = os.environ.get(ENV_VAR, "").strip()
    if not raw:
        return None
    names = {b.name for b in _REGISTRY[op]}
    plain: str | None = None
    for entry_op, name in _env_entries(raw):
        if entry_op == op:
            return None if name == "auto" else name
        # a plain name applies to the ops that have it; the others keep auto
        if entry_op is None and plain is None and name in names:
            plain = name
    return plain


def _format_reasons(reasons: dict[str, str | None]) -> str:
    return "\n".join(f"  - {name}: {reason or 'supported'}" for name, reason in reasons.items())


def select_backend(op: str, backend: str, problem: Any) -> Backend:
    """Pick the backend for ``op`` on ``problem`` (see the module docstring for the rules)."""
    backends = _REGISTRY[op]
    by_name = {b.name: b for b in backends}
    source = "backend="
    if backend == "auto":
        env = _env_choice(op)
        if env is not None:
            backend, source = env, f"{ENV_VAR}="
    if backend != "auto":
        if backend not in by_name:
            raise BackendUnavailableError(
                f"unknown backend {backend!r} for {op} (from {source}); choose 'auto' or one of {sorted(by_name)}"
            )
        chosen = by_name[backend]
        reason = chosen.check(problem)
        if reason is not None:
            raise BackendUnavailableError(
                f"backend {backend!r} (from {source}) does not support these {op} inputs: {reason}\n"
                f"backends for {op}:\n{_format_reasons(backend_reasons(op, problem))}"
            )
        return chosen
    for b in backends:
        if b.check(problem) is None and b.auto_check(problem) is None:
            return b
    raise BackendUnavailableError(
        f"no backend supports these {op} inputs:\n{_format_reasons(backend_reasons(op, problem, auto=True))}"
    )
