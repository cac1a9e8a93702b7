"""Atomic checkpoints, keep-last-N plus best, exact resume (RNG states included), safe loading, run folders.

Public API (stable; the MIL, probing and scanpath entry points import it):

* ``atomic_save(obj, path)``: ``torch.save`` to a temporary file in the same folder, ``fsync``, then
  ``os.replace``: a reader never sees a half-written file, even after ``kill -9``.
* ``load_checkpoint_file(path)``: the one loader of every checkpoint a user names or a run folder holds:
  ``weights_only=True`` (no file runs code); a file that needs pickle is refused naming the file.
* ``CheckpointManager(directory, keep_last=3, mode="max", prefix="ckpt")``:

  - ``save(state, step, metric=None) -> Path``: writes ``{prefix}_{step:08d}.pt``, keeps the newest
    ``keep_last`` step files up to ``step`` (never a newer one, never the file just written), and copies the
    best one (by ``metric``, ``mode`` max/min) to ``{prefix}_best.pt`` (its step and metric also in
    ``{prefix}_best.json``, so a restart does not load the whole file to read one number). Only rank 0
    should call it (the caller decides; see ``zoo.train.distributed``).
  - ``load_latest(map_location="cpu") -> dict | None``: the newest checkpoint that loads; a corrupt or
    truncated newest file is skipped with a warning naming it, and the previous one is returned. A file
    that needs pickle is never skipped silently: it is an error.
  - ``resolve_resume(resume, map_location="cpu") -> dict | None``: ``--resume`` semantics: ``""`` or
    ``None`` starts fresh, ``"auto"`` = ``load_latest`` (fresh start if there is none), anything else is a
    path that must load (an error names it otherwise).
  - ``latest_path()`` / ``best_path`` / ``list_checkpoints()`` / ``run_files()``.
  - Temporary files left by an interrupted save are removed when the manager is created.

* ``prepare_run_folder(out_dir, manager, resume, overwrite, logs)``: a fresh run never mixes with the run a
  folder already holds: it refuses (naming ``--resume auto`` and ``--overwrite``) or, with ``overwrite``,
  removes that run's checkpoints and logs first. ``--resume FILE`` must not go back behind newer checkpoints
  of the folder.
* Sharded checkpoints (FSDP on several processes): ``save_sharded(tensors, meta, step, metric, is_main)``
  writes ``{prefix}_{step:08d}.dcp/`` with ``torch.distributed.checkpoint`` (each rank its shards, nothing
  gathered on one process) plus ``meta.pt`` (the plain-data rest); ``load_sharded(target, directory)``
  fills any state dict from it, sharded or whole, so a run resumes on another number of processes (2 -> 1,
  1 -> 2). Its ``.metadata`` pickle is read by a restricted unpickler that admits only DCP's metadata classes.
* ``capture_rng_state() -> dict`` / ``restore_rng_state(state)``: Python ``random``, NumPy, torch CPU and
  (when present) every CUDA device, so a resumed run draws the same random numbers as an uninterrupted one.
  Stored as tensors and plain Python values: loadable with ``weights_only=True``.

A checkpoint is a plain dict; the training loop stores ``model``, ``optimizer``, ``scheduler``, ``ema``,
``scaler``, ``sampler`` (epoch and position), ``rng``, ``step``, ``epoch``, ``config`` in it.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import re
import shutil
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .._io import CorruptFileError, UnsafeFileError, atomic_write, clean_temporaries, file_in_folder_path, safe_load

__all__ = [
    "CheckpointManager",
    "CorruptFileError",
    "RunFolderError",
    "UnsafeFileError",
    "atomic_save",
    "capture_rng_state",
    "check_out_dir",
    "load_checkpoint_file",
    "load_sharded",
    "prepare_run_folder",
    "restore_rng_state",
]


class RunFolderError(ValueError):
    """A run folder that holds another run (or newer checkpoints than the one to resume)."""


def atomic_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save(obj)`` to ``path`` atomically (temporary file in the same folder + ``os.replace``)."""
    with atomic_write(path) as tmp:
        torch.save(obj, tmp)
    return Path(path)


def load_checkpoint_file(path: str | os.PathLike, map_location: Any = "cpu") -> Any:
    """A checkpoint's content, loaded with ``weights_only=True`` (see ``zoo._io.safe_load``).

    A sharded checkpoint folder (``*.dcp``) gives its ``meta.pt`` with ``sharded_dir`` set: its tensors are
    read into the caller's (possibly sharded) state dicts by ``load_sharded``.
    """
    path = Path(path)
    if path.is_dir() and (path / ".metadata").is_file():
        meta = safe_load(path / "meta.pt", map_location=map_location, what="checkpoint")
        if isinstance(meta, dict):
            meta["sharded_dir"] = str(path)
        return meta
    return safe_load(path, map_location=map_location, what="checkpoint")


# torch.distributed.checkpoint's .metadata is a plain pickle of these classes (and torch sizes, dtypes,
# layouts, paths): anything else in it is refused, so a planted .metadata runs no code
_DCP_GLOBALS = {
    "torch.distributed.checkpoint.metadata": {
        "Metadata", "ChunkStorageMetadata", "TensorStorageMetadata", "BytesStorageMetadata", "TensorProperties",
        "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING",
    },
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},
    "pathlib": {"PosixPath", "PurePosixPath"},
    "collections": {"OrderedDict"},
}  # fmt: skip


class _MetadataUnpickler(pickle.Unpickler):
    def __init__(self, file: Any, path: Path) -> None:
        super().__init__(file)
        self.path = path

    def find_class(self, module: str, name: str) -> Any:
        if name in _DCP_GLOBALS.get(module, ()):
            return super().find_class(module, name)
        if module == "torch" and (name == "Size" or isinstance(getattr(torch, name, None), torch.dtype)):
            return getattr(torch, name)
        raise UnsafeFileError(
            f"sharded checkpoint metadata {self.path} was refused: it names {module}.{name}, which is not "
            "checkpoint metadata (loading it would run code through pickle)"
        )


def _read_dcp_metadata(path: Path) -> Any:
    """A DCP ``.metadata`` file through the restricted unpickler; clear errors naming it."""
    if not path.is_file():
        raise CorruptFileError(f"sharded checkpoint {path.parent} has no {path.name}: it is incomplete or not one")
    with open(path, "rb") as f:
        try:
            return _MetadataUnpickler(f, path).load()
        except UnsafeFileError:
            raise
        except (pickle.UnpicklingError, EOFError, AttributeError, ValueError, TypeError, IndexError) as err:
            raise CorruptFileError(f"sharded checkpoint metadata {path} is damaged ({err})") from None


def _safe_dcp_reader(directory: Path) -> Any:
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class SafeReader(FileSystemReader):
        """DCP's reader with its one ``pickle.load`` (the metadata) replaced by the restricted unpickler."""

        def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
            path = Path(self._get_metadata_path(kwargs.get("rank")))
            metadata = _read_dcp_metadata(path)
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return SafeReader(str(directory))


def load_sharded(target: dict[str, Any], directory: str | os.PathLike) -> None:
    """Fill ``target`` (``{'model': state_dict, 'optimizer': ...}``, sharded or whole) from a ``*.dcp`` folder.

    Works on any number of processes (DCP reshards), in one process without a process group too. Tensors are
    read with ``weights_only``; the metadata by a restricted unpickler.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    directory = Path(directory)
    _read_dcp_metadata(directory / ".metadata")  # refused or damaged: one clear error before DCP sees it
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
        warnings.filterwarnings("ignore", message=".*single process")
        try:
            dcp.load(target, storage_reader=_safe_dcp_reader(directory))
        except CheckpointException as err:  # DCP gathers every rank's failure into one long report
            first = next((line for line in str(err).splitlines() if "Error" in line), str(err).splitlines()[0])
            raise CorruptFileError(f"sharded checkpoint {directory} cannot be read: {first.strip()}") from None


def capture_rng_state() -> dict[str, Any]:
    """Every RNG a training step may draw from: ``random``, NumPy, torch CPU and CUDA (per device)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),  # (version, tuple of ints, float | None): plain data
        "numpy": dict(
            name=str(name),
            keys=torch.from_numpy(keys.astype(np.int64)),
            pos=int(pos),
            has_gauss=int(has_gauss),
            cached_gaussian=float(cached),
        ),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Inverse of ``capture_rng_state``; a CUDA state is restored only when CUDA is present."""
    random.setstate(state["python"])
    numpy_state = state["numpy"]
    if isinstance(numpy_state, dict):
        keys = np.asarray(numpy_state["keys"], dtype=np.int64).astype(np.uint32)
        numpy_state = (
            numpy_state["name"],
            keys,
            numpy_state["pos"],
            numpy_state["has_gauss"],
            numpy_state["cached_gaussian"],
        )
    np.random.set_state(numpy_state)  # a tuple: checkpoints written before the plain-data format
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
        self._pattern = re.compile(rf"^{re.escape(prefix)}_(\d+)\.(?:pt|dcp)$")
        clean_temporaries(self.directory)  # what an interrupted save left behind
        if self.directory.is_dir():  # and an interrupted sharded save (a folder)
            for partial in self.directory.glob(f".{prefix}_*.dcp.partial"):
                shutil.rmtree(partial, ignore_errors=True)
        self._best_metric: float | None = None
        self._best_known = False
        if self.best_path.is_file() and not self._best_record.is_file():
            _ = self.best_metric  # a folder without the record: read (safely) now, so a bad file fails up front

    @property
    def best_path(self) -> Path:
        return self.directory / f"{self.prefix}_best.pt"

    @property
    def best_sharded_path(self) -> Path:
        return self.directory / f"{self.prefix}_best.dcp"

    @property
    def _best_record(self) -> Path:
        return self.directory / f"{self.prefix}_best.json"

    @property
    def best_metric(self) -> float | None:
        """The best metric so far (a resumed run keeps comparing against it); read from the folder once."""
        if not self._best_known:
            self._best_metric = self._read_best_metric()
            self._best_known = True
        return self._best_metric

    @best_metric.setter
    def best_metric(self, value: float | None) -> None:
        self._best_metric, self._best_known = value, True

    def _read_best_metric(self) -> float | None:
        try:
            return json.loads(self._best_record.read_text())["metric"]
        except (OSError, ValueError, KeyError, TypeError):
            pass
        if not self.best_path.is_file():
            return None
        try:  # a folder written before the .json record: the metric is inside the file
            state = load_checkpoint_file(self.best_path)
        except CorruptFileError:
            return None  # simply replaced by the next best
        return state.get("metric") if isinstance(state, dict) else None

    @staticmethod
    def _step_of(path: Path) -> int:
        return int(path.stem.rsplit("_", 1)[1])

    def list_checkpoints(self) -> list[Path]:
        """Step checkpoints, oldest first."""
        if not self.directory.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.directory.iterdir() if (m := self._pattern.match(p.name))]
        return [p for _, p in sorted(found, key=lambda item: item[0])]

    def latest_path(self) -> Path | None:
        paths = self.list_checkpoints()
        return paths[-1] if paths else None

    def run_files(self) -> list[Path]:
        """Every checkpoint of this manager in its folder (step files or folders, the best one and its record)."""
        best = (self.best_path, self.best_sharded_path, self._best_record)
        return self.list_checkpoints() + [p for p in best if p.exists()]

    def remove_all(self) -> None:
        """Delete this manager's checkpoints (``--overwrite``); other files in the folder are left alone."""
        for path in self.run_files():
            _remove(path)
        self.best_metric = None

    def _prune(self, step: int) -> None:
        if self.keep_last:
            # only checkpoints up to this step: never the one just written, never a newer one (another run's)
            older = [p for p in self.list_checkpoints() if self._step_of(p) < step]
            for old in older[: max(0, len(older) - (self.keep_last - 1))]:
                _remove(old)

    def _record_best(self, step: int, metric: float) -> None:
        with atomic_write(self._best_record) as tmp:
            tmp.write_text(json.dumps(dict(step=step, metric=metric)))

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
            with atomic_write(self.best_path) as tmp:  # never half-written either
                shutil.copyfile(path, tmp)
            self._record_best(step, metric)
        self._prune(step)
        return path

    def save_sharded(
        self,
        tensors: dict[str, Any],
        meta: dict[str, Any],
        step: int,
        metric: float | None = None,
        is_main: bool = True,
    ) -> Path:
        """A collective: every rank writes its shards of ``tensors`` into ``{prefix}_{step:08d}.dcp/``.

        ``meta`` (plain data: scheduler, RNG states, config...) goes to ``meta.pt`` inside, written by rank 0.
        The folder is built under a temporary name and renamed when complete; the best one is copied to
        ``{prefix}_best.dcp``. Older folders are pruned as step files are.
        """
        import torch.distributed as dist
        import torch.distributed.checkpoint as dcp

        final = self.directory / f"{self.prefix}_{step:08d}.dcp"
        partial = self.directory / f".{final.name}.partial"  # the same name on every rank
        if is_main:
            shutil.rmtree(partial, ignore_errors=True)
            partial.mkdir(parents=True)
        if dist.is_initialized():
            dist.barrier()
        dcp.save(tensors, checkpoint_id=str(partial))
        if dist.is_initialized():
            dist.barrier()
        if is_main:
            atomic_save(dict(meta, step=step, metric=metric, sharded=True), partial / "meta.pt")
            _remove(final)
            os.replace(partial, final)  # a reader sees a complete folder or none
            if metric is not None and self._is_better(metric):
                self.best_metric = metric
                copy = self.directory / f".{self.best_sharded_path.name}.partial"
                shutil.rmtree(copy, ignore_errors=True)
                shutil.copytree(final, copy)
                _remove(self.best_sharded_path)
                os.replace(copy, self.best_sharded_path)
                self._record_best(step, metric)
            self._prune(step)
        if dist.is_initialized():
            dist.barrier()
        return final

    def load_latest(self, map_location: Any = "cpu") -> dict[str, Any] | None:
        """The newest step checkpoint that loads; corrupt/truncated newer files are skipped with a warning.

        Raises:
            UnsafeFileError: a checkpoint in the folder needs pickle (planted or foreign): never skipped.
        """
        for path in reversed(self.list_checkpoints()):
            try:
                state = load_checkpoint_file(path, map_location=map_location)
            except (CorruptFileError, FileNotFoundError) as err:
                warnings.warn(f"checkpoint {path} is corrupt or truncated ({err}); falling back to the previous one",
                              stacklevel=2)  # fmt: skip
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
        if not path.exists():
            raise FileNotFoundError(
                f"--resume {resume}: no such file; pass 'auto' to use the newest in {self.directory}"
            )
        state = load_checkpoint_file(path, map_location=map_location)
        if not isinstance(state, dict) or "step" not in state or "model" not in state:
            raise CorruptFileError(
                f"--resume {resume} is not a zoo training checkpoint (no 'step' and 'model' entries); to start "
                "from its weights only, pass it as the model's checkpoint_path instead"
            )
        state["path"] = str(path)
        return state


def _remove(path: Path) -> None:
    """A checkpoint file or a sharded checkpoint folder."""
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _is_relative_to(path: Path, folder: Path) -> bool:
    try:
        path.resolve().relative_to(folder.resolve())
    except ValueError:
        return False
    return True


def check_out_dir(out_dir: str | os.PathLike, flag: str = "--out") -> Path:
    """``out_dir`` as a Path, after checking that no part of it is an existing file."""
    blocker = file_in_folder_path(out_dir)
    if blocker is not None:
        raise RunFolderError(f"{flag} {out_dir}: {blocker} is a file, not a folder; pick another {flag}")
    return Path(out_dir)


def prepare_run_folder(
    out_dir: str | os.PathLike,
    manager: CheckpointManager,
    resume: str | None,
    overwrite: bool = False,
    logs: Sequence[str] = ("metrics.csv",),
    remove: bool = True,
) -> None:
    """Make sure a run starting in ``out_dir`` cannot mix with (or delete) the run the folder holds.

    * fresh start (``resume`` empty): a folder holding checkpoints or logs of another run is refused, with the
      choices named; with ``overwrite`` those checkpoints and logs are deleted first (nothing else is);
    * ``resume='auto'``: continues the folder's run (the caller drops log rows past the resumed step);
    * ``resume=FILE``: refused when the folder holds checkpoints newer than FILE (they would be mixed).

    Args:
        out_dir: the run folder.
        manager: the run's checkpoint manager (its folder may be outside ``out_dir``).
        resume: ``''``, ``'auto'`` or a checkpoint path.
        overwrite: start over: delete the previous run's checkpoints and ``logs``.
        logs: file or folder names under ``out_dir`` that belong to a run (metrics, curves, results).
        remove: whether this process deletes (rank 0); other ranks only check.

    Raises:
        RunFolderError: the folder holds another run and ``overwrite`` is off; ``overwrite`` with a resume.
    """
    out = check_out_dir(out_dir)
    ckpts = manager.run_files()
    found_logs = [out / name for name in logs if (out / name).exists()]
    if overwrite and resume:
        raise RunFolderError(f"--overwrite starts over and --resume {resume} continues a run: pass one of them")
    if not resume:
        if not ckpts and not found_logs:
            return
        if not overwrite:
            latest = manager.latest_path()
            held = [
                f"checkpoints up to step {manager._step_of(latest)}" if latest else "",
                *(p.name for p in found_logs),
            ]
            raise RunFolderError(
                f"{out} already holds a run ({', '.join(h for h in held if h)}); pass --resume auto to continue "
                "it, --overwrite to start over (its checkpoints and logs are deleted), or another --out"
            )
        if remove:
            manager.remove_all()
            for path in found_logs:
                shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
        return
    if resume != "auto":
        path = Path(resume)
        latest = manager.latest_path()
        if latest is not None and path.exists() and latest.resolve() != path.resolve():
            inside = _is_relative_to(path, manager.directory)
            newer = [p for p in manager.list_checkpoints() if not inside or manager._step_of(p) > _step_or(path)]
            if newer:
                raise RunFolderError(
                    f"--resume {resume}: {manager.directory} holds "
                    + (
                        f"newer checkpoints of its run (up to {latest.name})"
                        if inside
                        else f"another run ({latest.name})"
                    )
                    + "; resuming there would mix two runs: copy the file and resume into another --out"
                )


def _step_or(path: Path, default: int = -1) -> int:
    match = re.search(r"_(\d+)\.(?:pt|dcp)$", path.name)
    return int(match.group(1)) if match else default
