"""Atomic checkpoints, keep-last-N plus best, and exact resume (RNG states included).

Public API (stable; the MIL, probing and scanpath entry points import it):

* ``atomic_save(obj, path)``: ``torch.save`` to a temporary file in the same folder, ``fsync``, then
  ``os.replace``: a reader never sees a half-written file, even after ``kill -9``.
* ``CheckpointManager(directory, keep_last=3, mode="max", prefix="ckpt")``:

  - ``save(state, step, metric=None) -> Path``: writes ``{prefix}_{step:08d}.pt``, keeps the newest
    ``keep_last`` step files, and copies the best one (by ``metric``, ``mode`` max/min) to
    ``{prefix}_best.pt``. Only rank 0 should call it (the caller decides; see ``zoo.train.distributed``).
  - ``load_latest(map_location="cpu") -> dict | None``: the newest checkpoint that loads; a corrupt or
    truncated newest file is skipped with a warning naming it, and the previous one is returned.
  - ``resolve_resume(resume, map_location="cpu") -> dict | None``: ``--resume`` semantics: ``""`` or
    ``None`` starts fresh, ``"auto"`` = ``load_latest`` (fresh start if there is none), anything else is a
    path that must load (an error names it otherwise).
  - ``latest_path()`` / ``best_path`` / ``list_checkpoints()``.

* ``capture_rng_state() -> dict`` / ``restore_rng_state(state)``: Python ``random``, NumPy, torch CPU and
  (when present) every CUDA device, so a resumed run draws the same random numbers as an uninterrupted one.

A checkpoint is a plain dict; the training loop stores ``model``, ``optimizer``, ``scheduler``, ``ema``,
``scaler``, ``sampler`` (epoch and position), ``rng``, ``step``, ``epoch``, ``config`` in it.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["CheckpointManager", "atomic_save", "capture_rng_state", "restore_rng_state"]


def atomic_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save(obj)`` to ``path`` atomically (temporary file in the same folder + ``os.replace``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # same folder: os.replace is only atomic within one filesystem
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def capture_rng_state() -> dict[str, Any]:
    """Every RNG a training step may draw from: ``random``, NumPy, torch CPU and CUDA (per device)."""
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Inverse of ``capture_rng_state``; a CUDA state is restored only when CUDA is present."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"].cpu() if isinstance(state["torch"], torch.Tensor) else state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class CheckpointManager:
    """Step checkpoints in one folder: keep the newest ``keep_last`` plus the best by a metric."""

    def __init__(self, directory: str | os.PathLike, keep_last: int = 3, mode: str = "max", prefix: str = "ckpt"):
        """
        Args:
            directory: folder of the checkpoints (created on the first save).
            keep_last: step checkpoints kept (older ones are deleted); 0 keeps all.
            mode: ``'max'`` (accuracy) or ``'min'`` (loss): which metric value is best.
            prefix: file name prefix, ``{prefix}_{step:08d}.pt`` and ``{prefix}_best.pt``.
        """
        if mode not in ("max", "min"):
            raise ValueError(f"mode={mode!r}; expected 'max' or 'min'")
        if keep_last < 0:
            raise ValueError(f"keep_last={keep_last} must be >= 0 (0 keeps every checkpoint)")
        self.directory = Path(directory)
        self.keep_last = keep_last
        self.mode = mode
        self.prefix = prefix
        self._pattern = re.compile(rf"^{re.escape(prefix)}_(\d+)\.pt$")
        self.best_metric: float | None = None
        best = self.best_path
        if best.exists():  # a resumed run keeps comparing against the best so far
            try:
                self.best_metric = torch.load(best, map_location="cpu", weights_only=False).get("metric")
            except Exception:  # noqa: BLE001 - a corrupt best file is simply replaced by the next best
                self.best_metric = None

    @property
    def best_path(self) -> Path:
        return self.directory / f"{self.prefix}_best.pt"

    def list_checkpoints(self) -> list[Path]:
        """Step checkpoints, oldest first."""
        if not self.directory.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.directory.iterdir() if (m := self._pattern.match(p.name))]
        return [p for _, p in sorted(found)]

    def latest_path(self) -> Path | None:
        paths = self.list_checkpoints()
        return paths[-1] if paths else None

    def _is_better(self, metric: float) -> bool:
        if self.best_metric is None:
            return True
        return metric > self.best_metric if self.mode == "max" else metric < self.best_metric

    def save(self, state: dict[str, Any], step: int, metric: float | None = None) -> Path:
        """Write ``state`` (plus ``step`` and ``metric``) as the step-``step`` checkpoint; prune; update best."""
        state = dict(state, step=step, metric=metric)
        path = atomic_save(state, self.directory / f"{self.prefix}_{step:08d}.pt")
        if metric is not None and self._is_better(metric):
            self.best_metric = metric
            # copy through a temp file too, so the best file is never half-written
            fd, tmp = tempfile.mkstemp(prefix=f".{self.best_path.name}.", suffix=".tmp", dir=self.directory)
            os.close(fd)
            shutil.copyfile(path, tmp)
            os.replace(tmp, self.best_path)
        if self.keep_last:
            for old in self.list_checkpoints()[: -self.keep_last]:
                old.unlink(missing_ok=True)
        return path

    def load_latest(self, map_location: Any = "cpu") -> dict[str, Any] | None:
        """The newest step checkpoint that loads; corrupt/truncated newer files are skipped with a warning."""
        for path in reversed(self.list_checkpoints()):
            try:
                state = torch.load(path, map_location=map_location, weights_only=False)
            except Exception as err:  # noqa: BLE001 - any load failure means "this file is unusable"
                warnings.warn(
                    f"checkpoint {path} is corrupt or truncated ({type(err).__name__}: {err}); "
                    "falling back to the previous one",
                    stacklevel=2,
                )
                continue
            if not isinstance(state, dict) or "step" not in state:
                warnings.warn(f"checkpoint {path} has no 'step' entry; skipping it", stacklevel=2)
                continue
            state["path"] = str(path)
            return state
        return None

    def resolve_resume(self, resume: str | None, map_location: Any = "cpu") -> dict[str, Any] | None:
        """``--resume`` semantics: ``''``/None fresh, ``'auto'`` newest valid (or fresh), else a file path."""
        if not resume:
            return None
        if resume == "auto":
            return self.load_latest(map_location=map_location)
        path = Path(resume)
        if not path.is_file():
            raise FileNotFoundError(
                f"--resume {resume}: no such file; pass 'auto' to use the newest in {self.directory}"
            )
        state = torch.load(path, map_location=map_location, weights_only=False)
        state["path"] = str(path)
        return state
