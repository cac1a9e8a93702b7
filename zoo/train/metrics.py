"""Progress bars, CSV metrics, optional TensorBoard / wandb, and a PNG of the curves.

Public API (stable; the MIL, probing and scanpath entry points import it):

* ``Progress(total, desc, enabled=True, every=20)``: a tqdm bar when stdout is a TTY; otherwise a plain
  line every ``every`` steps and at the end (logs and CI stay readable). ``update(n=1, **postfix)``,
  ``close()``; a context manager. ``enabled=False`` (ranks > 0) prints nothing.
* ``CSVWriter(path)``: ``write(row: dict)`` appends a row; the header is the first row's keys (later keys
  that were not in it are dropped, missing ones left empty); appends to an existing file on resume.
* ``MetricLogger(out_dir, backends=("csv",), enabled=True, run_name=None, config=None)``: one ``log(row,
  step)`` call fans a dict of scalars out to ``metrics.csv`` and, when listed in ``backends``, to
  TensorBoard (``tb/``) and wandb (``WANDB_MODE=offline`` unless the user set ``WANDB_MODE``). A
  backend whose package is missing is a clear error naming the pip extra. ``log_step(row, step)`` sends
  per-step scalars to TensorBoard and wandb (``train/<key>``); ``wandb_id`` continues a wandb run. ``close()``.
* ``rewind_csv(path, step) -> int``: drop the rows logged after ``step`` (a resumed run logs them again);
  returns how many were dropped.
* ``plot_curves(csv_path, png_path, x="epoch") -> Path``: loss and accuracy columns of a metrics CSV
  against ``x`` in one PNG (matplotlib, Agg backend).
"""

from __future__ import annotations

import csv
import math
import os
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

__all__ = ["CSVWriter", "MetricLogger", "Progress", "plot_curves", "rewind_csv"]


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


class Progress:
    """A per-epoch progress bar: tqdm on a TTY, plain periodic lines otherwise."""

    def __init__(
        self,
        total: int,
        desc: str = "",
        enabled: bool = True,
        every: int = 20,
        stream: Any = None,
        tty: bool | None = None,
    ):
        """
        Args:
            total: steps in the epoch.
            desc: prefix, e.g. ``'train 3/10'``.
            enabled: False prints nothing (non-zero ranks).
            every: steps between plain lines when stdout is not a TTY.
            stream: output stream, ``sys.stdout`` by default.
            tty: force the bar (True) or plain lines (False); default: ``stream.isatty()``.
        """
        self.total, self.desc, self.enabled, self.every = total, desc, enabled, max(1, every)
        self.stream = stream or sys.stdout
        self.count = 0
        self.postfix: dict[str, Any] = {}
        self.start = time.perf_counter()
        self._bar = None
        use_tty = self.stream.isatty() if tty is None else tty
        if enabled and use_tty:
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=desc, file=self.stream, dynamic_ncols=True, leave=True)

    def update(self, n: int = 1, **postfix: Any) -> None:
        """Advance ``n`` steps; ``postfix`` scalars (loss, lr, img/s) are shown next to the bar."""
        self.count += n
        self.postfix.update(postfix)
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.set_postfix({k: _fmt(v) for k, v in self.postfix.items()}, refresh=False)
            self._bar.update(n)
        elif self.count % self.every == 0 or self.count == self.total:
            self._line()

    def _line(self) -> None:
        elapsed = time.perf_counter() - self.start
        fields = " ".join(f"{k} {_fmt(v)}" for k, v in self.postfix.items())
        print(f"{self.desc} [{self.count}/{self.total}] {elapsed:.1f}s {fields}", file=self.stream, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class CSVWriter:
    """Append rows of scalars to a CSV file; the first row fixes the columns."""

    def __init__(self, path: str | os.PathLike, fieldnames: Sequence[str] | None = None):
        self.path = Path(path)
        self.fieldnames: list[str] | None = list(fieldnames) if fieldnames else None
        if self.fieldnames is None and self.path.is_file() and self.path.stat().st_size:
            with open(self.path, newline="") as f:  # resume: keep the existing header
                self.fieldnames = next(csv.reader(f), None)

    def write(self, row: dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        new_file = not self.path.is_file() or self.path.stat().st_size == 0
        if self.fieldnames is None:
            self.fieldnames = list(row)
        with open(self.path, "a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=self.fieldnames, extrasaction="ignore")
            if new_file:
                writer.writeheader()
            writer.writerow(row)


def rewind_csv(path: str | os.PathLike, step: int, column: str = "step") -> int:
    """Drop the rows of a metrics CSV whose ``column`` exceeds ``step``; rewrite atomically; rows dropped.

    A run killed after logging but before its checkpoint logs those rows again when resumed: without this,
    the CSV would hold them twice (or, resumed from an older checkpoint, rows of a future that never was).
    """
    from .._io import atomic_write

    path = Path(path)
    if not path.is_file() or path.stat().st_size == 0:
        return 0
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        fields, rows = reader.fieldnames or [], list(reader)

    def keep(row: dict[str, str]) -> bool:
        try:
            return float(row[column]) <= step
        except (KeyError, TypeError, ValueError):
            return True  # no step number: not a row this rewind can place

    kept = [r for r in rows if keep(r)] if column in fields else rows
    if len(kept) == len(rows):
        return 0
    with atomic_write(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(kept)
    return len(rows) - len(kept)


class MetricLogger:
    """Fan scalar rows out to CSV (always), TensorBoard and wandb (when asked)."""

    BACKENDS = ("csv", "tensorboard", "wandb")

    def __init__(
        self,
        out_dir: str | os.PathLike,
        backends: Iterable[str] = ("csv",),
        enabled: bool = True,
        run_name: str | None = None,
        config: dict[str, Any] | None = None,
        csv_name: str = "metrics.csv",
        wandb_id: str | None = None,
    ):
        """
        Args:
            out_dir: run folder; ``metrics.csv``, ``tb/`` and ``wandb/`` go under it.
            backends: any of ``csv``, ``tensorboard``, ``wandb`` (CSV is always written).
            enabled: False (non-zero ranks) writes nothing.
            run_name: wandb run name / TensorBoard sub-folder.
            config: hyper-parameters recorded by wandb.
            wandb_id: the wandb run to continue (a resumed training run keeps one wandb run); ``None``: a new
                id, readable as ``wandb_id`` afterwards (stored in checkpoints).
        """
        backends = set(backends) | {"csv"}
        unknown = backends - set(self.BACKENDS)
        if unknown:
            raise ValueError(f"unknown log backend(s) {sorted(unknown)}; expected some of {self.BACKENDS}")
        self.out_dir = Path(out_dir)
        self.enabled = enabled
        self.csv = CSVWriter(self.out_dir / csv_name) if enabled else None
        self._tb = None
        self._wandb = None
        self.wandb_id = wandb_id
        if not enabled:
            return
        if "tensorboard" in backends:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as err:
                raise ImportError("--log tensorboard needs the tensorboard package: pip install tensorboard") from err
            self._tb = SummaryWriter(log_dir=str(self.out_dir / "tb" / (run_name or "")))
        if "wandb" in backends:
            try:
                import wandb
            except ImportError as err:
                raise ImportError("--log wandb needs the wandb package: pip install 'attention-zoo[wandb]'") from err
            os.environ.setdefault("WANDB_MODE", "offline")  # never reach the network unless the user asked
            self.wandb_id = wandb_id or wandb.util.generate_id()
            # resume="allow": the same id continues the same run after a restart (no deprecated reinit=)
            self._wandb = wandb.init(
                dir=str(self.out_dir), name=run_name, config=config or {}, id=self.wandb_id, resume="allow"
            )

    @property
    def csv_path(self) -> Path | None:
        return self.csv.path if self.csv else None

    def log(self, row: dict[str, Any], step: int) -> None:
        """Record ``row`` (scalars; non-numeric values go to the CSV only) at global ``step``."""
        if not self.enabled:
            return
        self.csv.write(dict(row, step=step) if "step" not in row else row)
        scalars = {k: float(v) for k, v in row.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if self._tb is not None:
            for key, value in scalars.items():
                self._tb.add_scalar(key, value, step)
            self._tb.flush()
        if self._wandb is not None:
            self._wandb.log(scalars, step=step)

    def log_step(self, row: dict[str, Any], step: int) -> None:
        """Per-step scalars (loss, lr, ...) to TensorBoard and wandb as ``train/<key>``; the CSV of steps is
        the caller's (``steps.csv``), so ``metrics.csv`` keeps one row per evaluation."""
        if not self.enabled:
            return
        scalars = {
            f"train/{k}": float(v) for k, v in row.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
        }
        if self._tb is not None:
            for key, value in scalars.items():
                self._tb.add_scalar(key, value, step)
        if self._wandb is not None:
            self._wandb.log(scalars, step=step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


def plot_curves(
    csv_path: str | os.PathLike,
    png_path: str | os.PathLike,
    x: str = "epoch",
    steps_csv: str | os.PathLike | None = None,
) -> Path:
    """One PNG with a loss panel and an accuracy panel from a metrics CSV (columns containing 'loss'/'acc').

    ``steps_csv`` (columns ``step``, ``loss``) adds the per-step training loss to the loss panel; use
    ``x="step"`` then, so both share the axis (a one-epoch run otherwise shows single points).
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as err:
        raise ImportError("plot_curves needs matplotlib: pip install matplotlib") from err
    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise ValueError(f"{csv_path} has no rows to plot")
    if x not in rows[0]:
        raise ValueError(f"{csv_path} has no column {x!r}; columns: {list(rows[0])}")

    def series(col: str) -> tuple[list[float], list[float]]:
        xs, ys = [], []
        for r in rows:
            try:
                xv, yv = float(r[x]), float(r[col])
            except (TypeError, ValueError):
                continue
            if math.isfinite(yv):
                xs.append(xv)
                ys.append(yv)
        return xs, ys

    panels = [("loss", [c for c in rows[0] if "loss" in c]), ("accuracy", [c for c in rows[0] if "acc" in c])]
    panels = [(title, cols) for title, cols in panels if cols]
    step_rows: list[dict[str, str]] = []
    if steps_csv is not None and Path(steps_csv).is_file():
        with open(steps_csv, newline="") as f:
            step_rows = list(csv.DictReader(f))
    fig, axes = plt.subplots(1, max(1, len(panels)), figsize=(5 * max(1, len(panels)), 3.6), squeeze=False)
    for ax, (title, cols) in zip(axes[0], panels):
        if title == "loss" and step_rows:
            xs = [float(r["step"]) for r in step_rows]
            ax.plot(xs, [float(r["loss"]) for r in step_rows], linewidth=0.8, alpha=0.6, label="train loss per step")
        if title == "accuracy" and step_rows and step_rows[0].get("train_acc1"):
            xs = [float(r["step"]) for r in step_rows if r.get("train_acc1")]
            ys = [float(r["train_acc1"]) for r in step_rows if r.get("train_acc1")]
            ax.plot(xs, ys, linewidth=0.8, alpha=0.6, label="train top-1 per step (this rank's batch)")
        for col in cols:
            xs, ys = series(col)
            if xs:
                ax.plot(xs, ys, marker="o", markersize=3, label=col)
        ax.set_xlabel(x)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    png_path = Path(png_path)
    png_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
    return png_path
