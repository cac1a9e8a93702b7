"""File safety shared by every layer: files a user hands in never run code, writes are atomic, names stay home.

* ``safe_load(path)``: ``torch.load(..., weights_only=True)`` (or safetensors); a file that needs pickle to
  rebuild an object is refused with :class:`UnsafeFileError` naming the file, a damaged one with
  :class:`CorruptFileError`. The one loader every task, tool and model factory uses.
* ``atomic_write(path)``: a context manager yielding a temporary path in the same folder; on success it is
  flushed to disk, given the permissions a plain ``open()`` would give (``mkstemp`` makes 0600) and renamed
  over ``path``. A reader never sees a half-written file, even after ``kill -9``.
* ``clean_temporaries(folder)``: removes what an interrupted ``atomic_write`` left in ``folder``.
* ``plain_name(name, ...)`` / ``confined_path(root, relative, ...)``: names and relative paths read from a
  CSV or JSON may not leave the folder they are meant for (absolute paths, ``..``, separators are refused
  with :class:`UnsafePathError` naming the row).

This module imports only the standard library and torch, so ``zoo.data``, ``zoo.models`` and ``zoo.train``
can all use it.
"""

from __future__ import annotations

import os
import pickle
import pickletools
import re
import tempfile
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

__all__ = [
    "CorruptFileError",
    "UnsafeFileError",
    "UnsafePathError",
    "atomic_write",
    "atomic_write_text",
    "clean_temporaries",
    "confined_path",
    "file_in_folder_path",
    "plain_name",
    "register_plain_data_class",
    "safe_load",
]

# what a plain open() gives: 0666 minus the process umask (read once; os.umask can only be read by setting it)
_UMASK = os.umask(0)
os.umask(_UMASK)
FILE_MODE = 0o666 & ~_UMASK
TEMP_SUFFIXES = (".tmp", ".partial")


class UnsafeFileError(ValueError):
    """A file that would need Python's pickle (arbitrary code) to load."""


class CorruptFileError(ValueError):
    """A file that is truncated, damaged or not a PyTorch / safetensors file at all."""


class UnsafePathError(ValueError):
    """A name or relative path read from a file points outside the folder it belongs to."""


# --------------------------------------------------------------------------------------------- loading


_STAND_INS: dict[str, type] = {}


def register_plain_data_class(qualified_name: str, base: type = object) -> type:
    """Let ``safe_load`` rebuild objects of ``qualified_name`` (``'module.Class'``) as plain attribute bags.

    Authors' training scripts pickle small config objects next to their weights (ACMIL's ``utils.utils.Struct``,
    Lightning's ``AttributeDict``). Their classes are not importable here and need not be: a stand-in with no
    methods (``base`` = ``object`` or ``dict``) takes their attributes or items, so the weights load with
    ``weights_only=True`` and no code from the file or the authors' package runs. Family files register the
    names their authors' checkpoints need.
    """
    if qualified_name not in _STAND_INS:
        module, _, name = qualified_name.rpartition(".")
        _STAND_INS[qualified_name] = type(name, (base,), {"__module__": module, "__qualname__": name})
    return _STAND_INS[qualified_name]


def _plain_data_globals() -> list[Any]:
    """The few classes whose pickled form is plain data: NumPy arrays (older zoo checkpoints stored RNG states
    so), ``argparse.Namespace`` (timm's training checkpoints keep their arguments so) and paths. Rebuilding
    them runs no code from the file."""
    import argparse
    import pathlib

    # paths pickle as their class applied to strings (the EP repo's runs keep args.data_path so)
    allowed: list[Any] = [argparse.Namespace, pathlib.PosixPath, pathlib.PurePosixPath, pathlib.PureWindowsPath]
    try:
        import numpy as np
    except ImportError:
        return [*allowed, *_STAND_INS.values()]
    core = getattr(np, "_core", None) or np.core
    return [
        *allowed,
        *_STAND_INS.values(),
        core.multiarray._reconstruct,
        np.ndarray,
        np.dtype,
        type(np.dtype(np.uint32)),
    ]


def _unpickle_reason(err: BaseException) -> str:
    """The weights-only unpickler's own reason ('Unsupported global: GLOBAL posix.system ...'), without torch's
    advice (to load with ``weights_only=False`` or to allowlist the global: zoo never gives either)."""
    lines = []
    for line in str(err).splitlines():
        line = line.strip()
        if "WeightsUnpickler error:" in line:
            line = line.split("WeightsUnpickler error:", 1)[1].strip()
        line = re.split(r"\s*(?:Please use|Please file|Check the documentation)", line)[0].strip()
        if line and "Weights only load failed" not in line and "weights_only" not in line:
            lines.append(line)
    return " ".join(lines) or type(err).__name__


def _needs_pickle(reason: str) -> bool:
    """Whether the weights-only unpickler stopped at real pickle (a global, or an opcode it does not run) rather
    than at bytes that are no pickle at all (a text file, a damaged file)."""
    if re.search(r"global|unsupported class", reason, re.IGNORECASE):
        return True
    match = re.search(r"unsupported operand (\d+)", reason, re.IGNORECASE)
    return bool(match) and chr(int(match.group(1))) in pickletools.code2op


def safe_load(path: str | os.PathLike, map_location: Any = "cpu", what: str = "checkpoint") -> Any:
    """Load a ``torch.save`` or ``.safetensors`` file without running any code from it.

    Args:
        path: the file.
        map_location: as ``torch.load``'s.
        what: how error messages name the file ('checkpoint', 'weight file', 'token chunk').

    Raises:
        FileNotFoundError: no such file.
        UnsafeFileError: the file holds objects that only pickle can rebuild (a model object, a payload).
        CorruptFileError: truncated or not a checkpoint at all.
    """
    import torch

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} does not exist" + (" (it is a folder)" if path.is_dir() else ""))
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        device = map_location if isinstance(map_location, str) else "cpu"
        try:
            return load_file(str(path), device=device)
        except Exception as err:  # noqa: BLE001 - safetensors raises its own SafetensorError and OSError
            raise CorruptFileError(f"{what} {path} is not a readable .safetensors file ({err})") from None
    try:
        with torch.serialization.safe_globals(_plain_data_globals()), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        reason = _unpickle_reason(err)
        if _needs_pickle(reason):
            raise UnsafeFileError(
                f"{what} {path} was refused: loading it would run code through pickle ({reason}). zoo loads "
                "only tensors and plain data; re-save the weights as a state dict "
                "(torch.save(model.state_dict(), path)) or as .safetensors"
            ) from None
        raise CorruptFileError(f"{what} {path} is damaged or not a PyTorch file ({reason})") from None
    except (RuntimeError, EOFError, OSError, ValueError, KeyError, IndexError, AttributeError) as err:
        size = path.stat().st_size
        raise CorruptFileError(
            f"{what} {path} ({size} bytes) is truncated or not a PyTorch file ({type(err).__name__}: "
            f"{str(err).splitlines()[0].split('. ')[0] if str(err) else ''})"
        ) from None


# --------------------------------------------------------------------------------------------- writing


@contextmanager
def atomic_write(path: str | os.PathLike, suffix: str = ".tmp") -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it over ``path`` when the block succeeds.

    The temporary file is named ``.<name>.<pid>.<random><suffix>`` (``clean_temporaries`` recognises it and
    leaves those of live processes alone), flushed to disk and given ``FILE_MODE`` before the rename.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # same folder: os.replace is atomic only within one filesystem
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` atomically (UTF-8)."""
    with atomic_write(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


_TEMP_RE = re.compile(r"^\..+?\.(\d+)\.[^.]+(?:\.tmp|\.partial)$")


def clean_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Remove the temporary files an interrupted ``atomic_write`` left in ``folder`` (not recursive).

    Files of a process that is still running (another writer in the same folder) are kept. Returns the
    removed paths.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for p in folder.iterdir():
        if not (p.name.startswith(".") and p.name.endswith(TEMP_SUFFIXES) and p.is_file()):
            continue
        match = _TEMP_RE.match(p.name)
        pid = int(match.group(1)) if match else None
        if pid is not None and pid != os.getpid() and _pid_alive(pid):
            continue
        if pid == os.getpid():
            continue  # one of ours, being written right now
        p.unlink(missing_ok=True)
        removed.append(p)
    return removed


# ----------------------------------------------------------------------------------------------- names


def plain_name(name: Any, what: str = "name", where: str = "") -> str:
    """``name`` as one file-name component: not empty, no separator, not '.', '..' or absolute.

    Args:
        name: the value read from a CSV / JSON (converted with ``str``).
        what: what it is ('slide id', 'display id'), for the message.
        where: where it was read ('labels.csv line 7'), for the message.
    """
    text = str(name).strip() if name is not None else ""
    bad = (
        not text
        or text in (".", "..")
        or "/" in text
        or "\\" in text
        or "\x00" in text
        or os.path.isabs(text)
        or (os.sep != "/" and os.sep in text)
    )
    if bad:
        place = f" ({where})" if where else ""
        raise UnsafePathError(
            f"{what} {name!r}{place} is not a plain file name: ids may not be empty, absolute or contain "
            "'/', '\\' or '..'; fix the row"
        )
    return text


def file_in_folder_path(folder: str | os.PathLike) -> Path | None:
    """The existing file that stands where ``folder`` or one of its parents must be a folder, else None."""
    for part in (Path(folder), *Path(folder).parents):
        if part.exists():
            return None if part.is_dir() else part
    return None


def confined_path(root: str | os.PathLike, relative: Any, what: str = "path", where: str = "") -> Path:
    """``root / relative`` for a relative path that stays inside ``root`` (no absolute path, no '..').

    Symbolic links inside ``root`` are the folder owner's choice and are followed.
    """
    text = str(relative).strip() if relative is not None else ""
    candidate = Path(text)
    place = f" ({where})" if where else ""
    if not text:
        raise UnsafePathError(f"{what}{place} is empty; fix the row")
    if candidate.is_absolute() or text.startswith(("\\", "~")) or re.match(r"^[A-Za-z]:[\\/]", text):
        raise UnsafePathError(
            f"{what} {relative!r}{place} must be relative to {root}; absolute paths are refused (fix the row "
            "or pass the folder it is relative to)"
        )
    if ".." in re.split(r"[\\/]", text) or "\x00" in text:
        raise UnsafePathError(f"{what} {relative!r}{place} leaves {root} ('..' is refused); fix the row")
    return Path(root) / candidate


# ------------------------------------------------------------------------------------------ state dicts


def load_state_dict_checked(
    model: Any, state_dict: Any, source: str, strict: bool = True, model_name: str | None = None
) -> None:
    """``model.load_state_dict(state_dict)`` with a short error naming ``source`` when they do not match.

    torch's own message lists every key (pages for a large model); this one gives the counts, a few
    examples of missing / unexpected / wrong-shape keys and the likely cause. Loading goes through the model's
    own load hooks (keys they rename are not reported as missing).

    Raises:
        ValueError: ``state_dict`` is not a mapping of tensors, is empty, or does not fit ``model``.
    """
    import torch

    if not isinstance(state_dict, Mapping) or not state_dict:
        raise ValueError(f"{source} holds no weights (empty or not a state dict); nothing to load into the model")
    not_tensors = [k for k, v in state_dict.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise ValueError(
            f"{source} is not a state dict: {len(not_tensors)} entries are not tensors ({_examples(not_tensors)})"
        )
    own = model.state_dict()
    wrong_shape = [
        f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}"
        for k, v in state_dict.items()
        if k in own and v.shape != own[k].shape
    ]
    if wrong_shape:
        missing = [k for k in own if k not in state_dict]
        unexpected = [k for k in state_dict if k not in own]
    else:
        result = model.load_state_dict(state_dict, strict=False)
        missing, unexpected = list(result.missing_keys), list(result.unexpected_keys)
        if not strict or (not missing and not unexpected):
            return
    parts = [
        f"{len(items)} {what} ({_examples(items)})"
        for items, what in (
            (missing, "missing keys"), (unexpected, "unexpected keys"),
            (wrong_shape, "keys of another shape, checkpoint vs model"),
        )
        if items
    ]  # fmt: skip
    raise ValueError(
        f"{source} does not fit {model_name or type(model).__name__}: {'; '.join(parts)}. It was probably saved "
        "from another architecture or another num_classes / in_chans: build the model it was saved from (same "
        "name and arguments)"
    )


def _examples(keys: list[str], n: int = 3) -> str:
    return ", ".join(keys[:n]) + (", ..." if len(keys) > n else "")
