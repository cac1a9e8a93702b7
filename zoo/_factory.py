"""``zoo.create_model``: timm's ``create_model`` with zoo's registry resolved first.

Every keyword of ``timm.create_model`` is accepted with the same meaning. For zoo architectures the
pretrained cfg comes from zoo's registry (a zoo class may share a timm name), and ``pretrained=True``
fetches the weight file up front (``file`` / ``state_dict`` / Hugging Face Hub / URL, as timm orders
them) so that a missing file offline is one clear error instead of a stack of network exceptions; timm
architectures with weights are fetched the same way.

Files and arguments are checked before anything is built or loaded:

* model keywords (``check_model_kwargs``): negative sizes and counts, rates outside [0, 1] and zero where
  only a positive size makes sense (``in_chans=0``) are a ``ValueError`` naming the keyword and the value;
* ``checkpoint_path`` is read with ``zoo._io.safe_load`` (no file runs code) and loaded strictly; a
  checkpoint of another model is a ``ValueError`` naming the file, the model and the keys that differ;
* a pretrained weight file that would need pickle is ``zoo._io.UnsafeFileError`` naming the file, a damaged
  one ``zoo._io.CorruptFileError`` (timm's own message advises ``weights_only=False``; zoo never does).
"""

from __future__ import annotations

import numbers
import os
import pickle
import sys
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import timm
import torch.nn as nn
from timm.layers import set_layer_config
from timm.models import PretrainedCfg
from timm.models._builder import resolve_pretrained_cfg as _timm_resolve_pretrained_cfg
from timm.models._helpers import clean_state_dict
from timm.models._hub import load_model_config_from_hf, load_model_config_from_path
from timm.models._pretrained import PretrainedCfg as _Cfg

from . import _registry
from ._io import CorruptFileError, load_state_dict_checked, safe_load
from ._registry import split_model_name_tag

__all__ = [
    "create_model",
    "check_model_kwargs",
    "load_checkpoint_path",
    "parse_model_name",
    "PretrainedWeightsUnavailableError",
    "resolve_pretrained_cfg",
]

_SOURCES = ("hf-hub", "local-dir")


class PretrainedWeightsUnavailableError(RuntimeError):
    """Pretrained weights were requested but no weight file can be had (offline, or not found)."""


# --------------------------------------------------------------------------------------- model keywords

# negatives that mean something: timm's indices counted from the end (out_indices=(-1,)), MEDUSA's gated
# levels (passed on as out_indices), BiFormer's per-stage topks (-2 = global attention)
NEGATIVE_OK = frozenset({"out_indices", "backbone_indices", "indices", "topks"})
# sizes and counts (and OAT's pos_sigma) for which 0 is as wrong as a negative (num_classes=0, a depth of 0,
# pos_conv_kernel=0 or body_attn_heads=0 stay valid: they mean "none")
POSITIVE_ONLY = frozenset(
    {
        "in_chans", "in_dim", "img_size", "patch_size", "embed_dim", "embed_dims", "dim", "hidden_dim",
        "attn_dim", "head_dim", "num_heads", "global_heads", "n_win", "window_size", "output_stride",
        "num_queries", "d_out", "d_model", "dim_feedforward", "max_objects", "max_len", "grid", "crop_size",
        "pos_dim", "pos_table_dim", "pointer_heads", "pointer_dim", "num_branches", "num_landmarks",
        "attn_size", "body_widths", "gate_chs", "qk_dims", "lce_kernel", "pos_sigma", "pos_norm",
    }
)  # fmt: skip
# probabilities: dropout rates and the like, in [0, 1]
_RATE_NAMES = frozenset({"dropout", "mask_drop", "bag_weight"})
_RATE_SUFFIXES = ("drop_rate", "drop_path_rate", "drop_block_rate", "_dropout", "drop_prob")
_HINTS = {"num_classes": " (0 removes the classifier)", "in_chans": " (3 for RGB, 1 for grayscale)"}


def _is_rate(key: str) -> bool:
    return key in _RATE_NAMES or key.endswith(_RATE_SUFFIXES)


def _numbers(value: Any, where: tuple[int, ...] = ()) -> Iterator[tuple[tuple[int, ...], float]]:
    """Every real number in ``value`` (nested lists / tuples too) with its index path; bools are not numbers."""
    if isinstance(value, bool):
        return
    if isinstance(value, numbers.Real):
        yield where, value
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            yield from _numbers(item, (*where, i))


def check_model_kwargs(model_name: str, kwargs: Mapping[str, Any]) -> None:
    """Refuse model keywords no model can mean, before anything is built.

    * a negative number, alone or inside a list / tuple (``depths=[-1, 2, 2, 2]``), except for the keywords
      in ``NEGATIVE_OK`` (indices from the end, BiFormer's ``topks``);
    * a rate (``drop_rate``, ``drop_path_rate``, ``*_drop_rate``, ``dropout``...) outside [0, 1];
    * 0 for the sizes and counts in ``POSITIVE_ONLY`` (``in_chans``, ``embed_dim``, ``num_heads``...), where it
      would build a model without any (or fall back to a default silently: ``max_objects=0``).

    Dicts (``backbone_kwargs``) are not entered: they are checked when their model is built. What only a
    constructor can know (heads dividing the width, ``topk`` against the regions) stays in the constructor.

    Raises:
        ValueError: naming the model, the keyword, the value and what to pass instead.
    """
    for key, value in kwargs.items():
        if key in NEGATIVE_OK:
            continue
        for where, number in _numbers(value):
            at = f" ({number!r} at index {', '.join(map(str, where))})" if where else ""
            shown = f"{key}={value!r}{at}"
            if _is_rate(key):
                if not 0.0 <= number <= 1.0:
                    raise ValueError(
                        f"{model_name}: {shown} is outside [0, 1]: {key} is a probability; pass a value from 0 "
                        f"to 1 (e.g. {key}=0.1)"
                    )
            elif not number >= 0:  # `not >=` also refuses NaN
                raise ValueError(
                    f"{model_name}: {shown} is negative; sizes and counts cannot be negative: pass {key} >= 0"
                    f"{_HINTS.get(key, '')}"
                )
            elif key in POSITIVE_ONLY and not number > 0:
                raise ValueError(
                    f"{model_name}: {shown} must be positive: 0 leaves the model without any; pass {key} > 0"
                    f"{_HINTS.get(key, '')}"
                )


def parse_model_name(model_name: str) -> tuple[str | None, str]:
    """Split ``'hf-hub:org/repo'`` / ``'local-dir:/path'`` into (source, id); plain names give (None, name)."""
    source, sep, model_id = model_name.partition(":")
    if sep:
        source = {"hf_hub": "hf-hub"}.get(source.lower(), source.lower())
        if source not in _SOURCES:
            raise ValueError(f"unknown model source {source!r} in {model_name!r}; expected one of {_SOURCES}")
        if not model_id:
            raise ValueError(f"model name {model_name!r} has no id or path after '{source}:'")
        return source, model_id
    if "/" in model_name or "\\" in model_name:
        raise ValueError(
            f"model name {model_name!r} looks like a Hub repo or a path; use 'hf-hub:{model_name}' or "
            f"'local-dir:{model_name}'"
        )
    return None, model_name


def resolve_pretrained_cfg(
    model_name: str,
    pretrained_cfg: str | dict | PretrainedCfg | None = None,
    pretrained_cfg_overlay: dict[str, Any] | None = None,
) -> PretrainedCfg:
    """The cfg a build of ``model_name`` will use: tag / dict / cfg object, then the overlay on top."""
    arch, tag = split_model_name_tag(model_name)
    if isinstance(pretrained_cfg, dict):
        cfg = _Cfg(**pretrained_cfg)
    elif isinstance(pretrained_cfg, _Cfg):
        cfg = pretrained_cfg
    else:
        tag = pretrained_cfg or tag
        cfg = _registry.get_pretrained_cfg(f"{arch}.{tag}" if tag else arch)
        if cfg is None:  # architecture without cfgs: an empty one, as timm makes
            cfg = _Cfg(architecture=arch)
    if pretrained_cfg_overlay:
        cfg = _Cfg(**{**cfg.to_dict(), **pretrained_cfg_overlay})
    return cfg


def _weights_hint(name: str, cfg: PretrainedCfg, expected: str) -> str:
    return (
        f"pretrained weights for {name!r} are not available here: expected {expected}. "
        f"Download the file on a machine with network access and pass it with "
        f"zoo.create_model({cfg.architecture!r}, pretrained=True, "
        f"pretrained_cfg_overlay=dict(file='/path/to/{Path(expected.split()[0].strip(chr(39))).name}')) "
        f"(official-format .pth and timm-format .safetensors both load), or fill the Hugging Face cache "
        f"(HF_HOME) and set HF_HUB_OFFLINE=1."
    )


def _reachable(url: str, timeout: float = 3.0) -> bool:
    """Whether the host of ``url`` accepts a TCP connection: offline, fail in seconds, not after retries."""
    import socket
    from urllib.parse import urlparse

    parsed = urlparse(url)
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        with socket.create_connection((parsed.hostname, port), timeout=timeout):
            return True
    except OSError:
        return False


_CHECKPOINT_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors", ".tar", ".ckpt", ".npz")


def _url_filename(name: str, url: str) -> str:
    """Cache file name of a URL: timm's (the URL's basename) unless that names no checkpoint.

    Share links (e.g. ``.../root/content``) end in the same word for every variant; they are cached as
    ``<arch.tag>.pth`` so that two variants never overwrite each other.
    """
    basename = os.path.basename(url.split("?")[0])
    return basename if basename.endswith(_CHECKPOINT_SUFFIXES) else f"{name}.pth"


def fetch_pretrained_file(name: str, cfg: PretrainedCfg, cache_dir: str | Path | None = None) -> str:
    """Local path of the weight file of ``cfg`` (downloading when online), in timm's source order.

    Raises:
        PretrainedWeightsUnavailableError: the file is missing / cannot be downloaded (offline); the
            message names the tag, the expected file and how to pass a local file.
    """
    if cfg.file:
        path = Path(cfg.file)
        if not path.is_file():
            raise PretrainedWeightsUnavailableError(
                f"pretrained_cfg file for {name!r} does not exist: {path}. Pass the path of a .pth or "
                ".safetensors checkpoint with pretrained_cfg_overlay=dict(file=...)."
            )
        return str(path)
    if cfg.hf_hub_id:
        from huggingface_hub import constants, hf_hub_download, try_to_load_from_cache

        filenames = [cfg.hf_hub_filename] if cfg.hf_hub_filename else ["model.safetensors", "pytorch_model.bin"]
        for filename in filenames:
            cached = try_to_load_from_cache(cfg.hf_hub_id, filename, cache_dir=cache_dir)
            if isinstance(cached, str):
                return cached
        error: Exception | None = None
        if constants.HF_HUB_OFFLINE or not _reachable(constants.ENDPOINT):
            error = ConnectionError(f"{constants.ENDPOINT} is not reachable (or HF_HUB_OFFLINE=1)")
        else:
            for filename in filenames:
                try:
                    return hf_hub_download(cfg.hf_hub_id, filename, cache_dir=cache_dir)
                except Exception as e:  # not on the Hub under this name: try the next name, then the URL
                    error = e
        if not cfg.url:
            expected = f"'{filenames[0]}' from the Hugging Face Hub repo '{cfg.hf_hub_id}'"
            raise PretrainedWeightsUnavailableError(_weights_hint(name, cfg, expected)) from error
    if cfg.url:
        from timm.models._hub import download_cached_file, get_cache_dir

        filename = _url_filename(name, cfg.url)
        cached_file = Path(cache_dir or get_cache_dir()) / filename
        try:
            if cached_file.is_file():
                return str(cached_file)
            if not _reachable(cfg.url):
                raise ConnectionError(f"{cfg.url} is not reachable")
            return download_cached_file((cfg.url, filename), cache_dir=cache_dir)
        except Exception as e:
            hub = f" (or 'model.safetensors' from the Hub repo '{cfg.hf_hub_id}')" if cfg.hf_hub_id else ""
            expected = f"'{filename}' from {cfg.url}{hub}"
            raise PretrainedWeightsUnavailableError(_weights_hint(name, cfg, expected)) from e
    raise PretrainedWeightsUnavailableError(
        f"{name!r} has no pretrained weights (its cfg names no url, hf_hub_id or file); available tags with "
        f"weights: {', '.join(_registry.list_pretrained(cfg.architecture or name)) or 'none'}. Pass a local "
        "checkpoint with pretrained_cfg_overlay=dict(file=...)."
    )


def _with_fetched_file(arch: str, cfg: PretrainedCfg, cache_dir: str | Path | None) -> PretrainedCfg:
    """``cfg`` with its weight file fetched up front (offline: one clear error), or unchanged when timm loads
    it another way (a state dict, a local-dir export, a custom loader)."""
    if cfg.state_dict is not None or cfg.source == "local-dir" or cfg.custom_load:
        return cfg
    tag_name = f"{arch}.{cfg.tag}" if cfg.tag else arch
    # source '' makes timm load the fetched file rather than go back to the Hub
    return _Cfg(**{**cfg.to_dict(), "file": fetch_pretrained_file(tag_name, cfg, cache_dir), "source": ""})


# where torch and safetensors read files: an error raised there is a file that could not be read
_READER_FILES = tuple(
    os.path.join(*parts)
    for parts in (("torch", "serialization.py"), ("torch", "_weights_only_unpickler.py"), ("safetensors", "torch.py"))
)


def _is_load_failure(err: BaseException) -> bool:
    """Whether ``err`` is timm / torch failing to read a weight file (rather than a model or filter error).

    A damaged file fails in many ways (IndexError, KeyError, RuntimeError...): what they share is that they
    were raised by torch's or safetensors' reader, possibly re-raised by timm with its own message.
    """
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, (pickle.UnpicklingError, EOFError)) or "weights_only" in str(err):
            return True
        tb = err.__traceback__
        while tb is not None:
            if tb.tb_frame.f_code.co_filename.endswith(_READER_FILES):
                return True
            tb = tb.tb_next
        err = err.__cause__ or err.__context__
    return False


@contextmanager
def _weight_file_errors(path: str | None) -> Iterator[None]:
    """Turn timm's failure to read the weight file ``path`` into zoo's errors, which name the file.

    timm loads with ``weights_only=True`` (nothing runs), but its message advises ``weights_only=False``; on
    such a failure the file is read again by ``safe_load``, which raises ``UnsafeFileError`` (needs pickle) or
    ``CorruptFileError`` naming it. Other errors (a filter refusing a checkpoint) pass unchanged.
    """
    try:
        yield
    except Exception as err:
        if not path or not _is_load_failure(err):
            raise
        safe_load(path, what="pretrained weight file")  # raises the clear error; loading fine is unexpected
        raise


def _unwrap_state_dict(checkpoint: Any, path: Path) -> dict[str, Any]:
    """The state dict of a checkpoint, as timm's ``load_checkpoint`` finds it (EMA weights first)."""
    if isinstance(checkpoint, Mapping):
        for key in ("state_dict_ema", "model_ema", "state_dict", "model"):
            if isinstance(checkpoint.get(key), Mapping):
                checkpoint = checkpoint[key]
                break
    if not isinstance(checkpoint, Mapping):
        raise CorruptFileError(
            f"checkpoint {path} holds a {type(checkpoint).__name__}, not a state dict; save the weights with "
            "torch.save(model.state_dict(), path)"
        )
    return clean_state_dict(dict(checkpoint))  # DDP 'module.' and torch.compile '_orig_mod.' prefixes


FilterFn = Callable[[dict[str, Any], nn.Module], dict[str, Any]]


def family_filter_fn(arch: str) -> FilterFn | None:
    """The ``checkpoint_filter_fn`` of the family file that registered zoo architecture ``arch``, if it has one.

    Filters map an authors' checkpoint layout to zoo's keys and are idempotent on zoo's own layout, so every
    route (``pretrained_cfg_overlay=dict(file=...)``, ``checkpoint_path=``) takes both.
    """
    if not _registry.is_zoo_model(arch):
        return None
    module = sys.modules.get(_registry.get_entry(arch).fn.__module__)
    return getattr(module, "checkpoint_filter_fn", None)


def load_checkpoint_path(
    model: nn.Module, checkpoint_path: str | os.PathLike, model_name: str = "", filter_fn: FilterFn | None = None
) -> None:
    """Load a checkpoint strictly into ``model`` without running any code from the file.

    The state dict is found as timm's ``load_checkpoint`` finds it (``state_dict_ema``, ``model_ema``,
    ``state_dict``, ``model``; ``module.`` prefixes dropped), then passed through ``filter_fn`` (the family's
    ``checkpoint_filter_fn``: authors' layouts to zoo's keys). ``.npz`` / ``.npy`` files go to the model's own
    ``load_pretrained`` (NumPy, no pickle), as in timm.

    Raises:
        FileNotFoundError, UnsafeFileError, CorruptFileError: from ``zoo._io.safe_load``, naming the file.
        ValueError: the checkpoint does not fit the model (missing / unexpected / wrong-shape keys).
    """
    path = Path(checkpoint_path)
    name = model_name or type(model).__name__
    if path.suffix.lower() in (".npz", ".npy"):
        if not hasattr(model, "load_pretrained"):
            raise ValueError(f"checkpoint {path} is a NumPy file, and {name} has no load_pretrained to read one")
        model.load_pretrained(str(path))
        return
    state_dict = _unwrap_state_dict(safe_load(path, map_location="cpu", what="checkpoint"), path)
    if filter_fn is not None:
        state_dict = filter_fn(state_dict, model)
    load_state_dict_checked(model, state_dict, f"checkpoint {path}", model_name=name)


# what timm.create_model passes to every entrypoint besides the model's own keywords
_FACTORY_KEYS = ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir")


def call_timm_entrypoint(fn: Callable[..., nn.Module], pretrained: bool, kwargs: dict[str, Any]) -> nn.Module:
    """``timm.create_model('<zoo-only arch>', ...)``: the checks and weight fetching of ``create_model``.

    timm calls the entrypoint with ``pretrained_cfg`` (a tag, dict or cfg), ``pretrained_cfg_overlay`` and
    ``cache_dir``; they are resolved here as ``create_model`` resolves them.
    """
    arch = fn.__name__
    check_model_kwargs(arch, {k: v for k, v in kwargs.items() if k not in _FACTORY_KEYS and v is not None})
    if not pretrained or _registry.model_kind(arch) != "backbone":
        return fn(pretrained=pretrained, **kwargs)
    cfg = kwargs.get("pretrained_cfg")
    if isinstance(cfg, dict):  # a local-dir / hf-hub config: timm loads what it names itself
        file = cfg.get("file")
    else:
        cfg = resolve_pretrained_cfg(arch, cfg, kwargs.get("pretrained_cfg_overlay"))
        cfg = _with_fetched_file(arch, cfg, kwargs.get("cache_dir"))
        kwargs = {**kwargs, "pretrained_cfg": cfg, "pretrained_cfg_overlay": None}
        file = cfg.file
    with _weight_file_errors(file):
        return fn(pretrained=pretrained, **kwargs)


def _load_hub_config(model_id: str, cache_dir: str | Path | None) -> tuple[dict, str, dict | None]:
    """``hf-hub:`` config.json, or one clear error offline (instead of the Hub client's retries and errors)."""
    from huggingface_hub import constants, try_to_load_from_cache

    cached = isinstance(try_to_load_from_cache(model_id, "config.json", cache_dir=cache_dir), str)
    error: Exception | None = None
    if cached or not (constants.HF_HUB_OFFLINE or not _reachable(constants.ENDPOINT)):
        try:
            return load_model_config_from_hf(model_id, cache_dir=cache_dir)
        except OSError as e:  # the Hub client's errors (not found, offline) are OSErrors
            error = e
    # timm's Hub repos are named after the arch.tag they hold: then the file route applies directly
    repo_name = model_id.rsplit("/", 1)[-1]
    by_name = (
        f"zoo.create_model({repo_name!r}, pretrained=True, pretrained_cfg_overlay=dict(file="
        "'/path/to/model.safetensors'))"
        if _registry.is_model(repo_name)
        else "zoo.create_model('<its architecture>', pretrained=True, pretrained_cfg_overlay=dict(file=...))"
    )
    raise PretrainedWeightsUnavailableError(
        f"model config 'config.json' of the Hugging Face Hub repo {model_id!r} is not available here "
        f"({error or 'offline or HF_HUB_OFFLINE=1'}). Download config.json and model.safetensors on a machine "
        f"with network access and build with zoo.create_model('local-dir:/path/to/folder', pretrained=True), "
        f"or pass the weight file with {by_name}."
    ) from error


def create_model(
    model_name: str,
    pretrained: bool = False,
    pretrained_cfg: str | dict | PretrainedCfg | None = None,
    pretrained_cfg_overlay: dict[str, Any] | None = None,
    checkpoint_path: str | Path | None = None,
    cache_dir: str | Path | None = None,
    scriptable: bool | None = None,
    exportable: bool | None = None,
    no_jit: bool | None = None,
    **kwargs: Any,
) -> nn.Module:
    """Build a model by name, zoo's registry first, then timm's; same keywords as ``timm.create_model``.

    Args:
        model_name: ``arch``, ``arch.tag``, ``hf-hub:org/repo`` or ``local-dir:/path``.
        pretrained: load the weights of the cfg (``pretrained_cfg_overlay=dict(file=...)`` for a local
            file, official or timm format: it goes through the family's ``checkpoint_filter_fn``).
        pretrained_cfg: a tag, a dict or a ``PretrainedCfg`` overriding the registry's.
        pretrained_cfg_overlay: keys replaced in the resolved cfg.
        checkpoint_path: a timm-format checkpoint loaded strictly after the build (no filter), read with
            ``zoo._io.safe_load``; see ``load_checkpoint_path``.
        cache_dir: Hub / URL cache folder.
        scriptable, exportable, no_jit: timm layer config during the build.
        **kwargs: ``num_classes``, ``in_chans``, ``global_pool``, ``drop_rate``, ``drop_path_rate``,
            ``features_only``, ``out_indices``, ``feature_cls`` and any model argument; ``None`` values
            are dropped, as timm does. Checked by ``check_model_kwargs`` first.

    Raises:
        ValueError: a keyword no model can mean (negative size, rate outside [0, 1]), or a checkpoint that
            does not fit the model; ``zoo._io.UnsafeFileError`` / ``CorruptFileError`` for weight files.
        PretrainedWeightsUnavailableError: ``pretrained=True`` and the weight file cannot be had (offline).
    """
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    source, model_id = parse_model_name(model_name)
    check_model_kwargs(model_id if source is None else model_name, kwargs)
    layer_config = dict(scriptable=scriptable, exportable=exportable, no_jit=no_jit)
    features = bool(kwargs.get("features_only")) and kwargs.get("out_indices") is not None
    if features:
        _check_out_indices_type(model_name, kwargs["out_indices"])
    try:
        return _create(
            model_name, source, model_id, pretrained, pretrained_cfg, pretrained_cfg_overlay, checkpoint_path,
            cache_dir, layer_config, kwargs,
        )  # fmt: skip
    except (IndexError, AssertionError) as error:  # timm: a bare "list index out of range"
        if features:
            _raise_if_out_indices_out_of_range(model_name, kwargs, error)
        raise


def _check_out_indices_type(model_name: str, out_indices: Any) -> None:
    items = out_indices if isinstance(out_indices, (tuple, list)) else [out_indices]
    if not items or not all(isinstance(i, int) and not isinstance(i, bool) for i in items):
        raise ValueError(
            f"{model_name}: out_indices={out_indices!r} must be an int or a tuple of ints (feature levels, "
            "negative ones counted from the last)"
        )


def _raise_if_out_indices_out_of_range(model_name: str, kwargs: dict[str, Any], error: Exception) -> None:
    """A clear ValueError when ``out_indices`` names levels the model does not have (found on a meta build)."""
    try:
        probe = {k: v for k, v in kwargs.items() if k not in ("features_only", "out_indices", "feature_cls")}
        levels = len(create_model(model_name, **{**probe, "device": "meta"}).feature_info)
    except Exception:  # the model cannot tell: keep the original error
        return
    out_indices = kwargs["out_indices"]
    if isinstance(out_indices, int):  # timm: an int n means the last n levels
        bad = not 0 < out_indices <= levels
    else:
        bad = any(not -levels <= i < levels for i in out_indices)
    if bad:
        raise ValueError(
            f"{model_name}: out_indices={out_indices!r} names feature levels it does not have: it has {levels} "
            f"(indices 0 to {levels - 1} or -{levels} to -1; an int n takes the last n); see zoo info {model_name}"
        ) from error


def _create(
    model_name: str,
    source: str | None,
    model_id: str,
    pretrained: bool,
    pretrained_cfg: str | dict | PretrainedCfg | None,
    pretrained_cfg_overlay: dict[str, Any] | None,
    checkpoint_path: str | Path | None,
    cache_dir: str | Path | None,
    layer_config: dict[str, bool | None],
    kwargs: dict[str, Any],
) -> nn.Module:
    if source is not None:
        if pretrained_cfg:
            raise ValueError(f"pretrained_cfg cannot be combined with a '{source}:' model name")
        if source == "hf-hub":
            cfg_dict, arch, model_args = _load_hub_config(model_id, cache_dir)
        else:
            cfg_dict, arch, model_args = load_model_config_from_path(model_id)
        if not _registry.is_zoo_model(arch):
            model = timm.create_model(
                model_name, pretrained, pretrained_cfg_overlay=pretrained_cfg_overlay, cache_dir=cache_dir,
                **layer_config, **kwargs,
            )  # fmt: skip
            return _load_checkpoint_path(model, checkpoint_path, arch)
        kwargs = {**(model_args or {}), **kwargs}
        pretrained_cfg = _Cfg(**{k: v for k, v in cfg_dict.items() if k in _Cfg.__dataclass_fields__})
        arch_name = arch
    else:
        arch_name = split_model_name_tag(model_id)[0]
        if not _registry.is_zoo_model(arch_name):
            if not timm.is_model(arch_name):
                raise RuntimeError(_registry._unknown_model_message(model_id))
            return _create_timm_model(
                model_id, pretrained, pretrained_cfg, pretrained_cfg_overlay, checkpoint_path, cache_dir,
                layer_config, kwargs,
            )  # fmt: skip

    cfg = resolve_pretrained_cfg(model_id if source is None else arch_name, pretrained_cfg, pretrained_cfg_overlay)
    if pretrained:
        cfg = _with_fetched_file(arch_name, cfg, cache_dir)
    entry = _registry.get_entry(arch_name)
    with set_layer_config(**layer_config), _weight_file_errors(cfg.file if pretrained else None):
        if entry.kind == "backbone":
            model = entry.fn(pretrained=pretrained, pretrained_cfg=cfg, cache_dir=cache_dir, **kwargs)
        else:  # heads build from plain kwargs (their cfg attached for tools); weights: the family's filter
            model = entry.fn(pretrained=False, pretrained_cfg=cfg, **kwargs)
            if pretrained:
                load_checkpoint_path(model, cfg.file, arch_name, family_filter_fn(arch_name))
    # constructor options recorded as timm does, so an export can rebuild the same model
    model._model_args = dict(
        getattr(model, "_model_args", {}),
        **{k: v for k, v in kwargs.items() if k not in ("device", "dtype", "pretrained_model_args")},
    )
    return _load_checkpoint_path(model, checkpoint_path, arch_name, family_filter_fn(arch_name))


def _load_checkpoint_path(
    model: nn.Module, checkpoint_path: str | Path | None, name: str, filter_fn: FilterFn | None = None
) -> nn.Module:
    if checkpoint_path:
        load_checkpoint_path(model, checkpoint_path, name, filter_fn)
    return model


def _create_timm_model(
    model_id: str,
    pretrained: bool,
    pretrained_cfg: str | dict | PretrainedCfg | None,
    pretrained_cfg_overlay: dict[str, Any] | None,
    checkpoint_path: str | Path | None,
    cache_dir: str | Path | None,
    layer_config: dict[str, Any],
    kwargs: dict[str, Any],
) -> nn.Module:
    """A timm architecture, with zoo's up-front weight fetching and zoo's checkpoint loading."""
    arch, tag = split_model_name_tag(model_id)
    file = None
    if pretrained:
        cfg = _timm_resolve_pretrained_cfg(arch, pretrained_cfg or tag, pretrained_cfg_overlay)
        if cfg.has_weights:  # a cfg without weights keeps timm's behaviour (a warning, random init)
            cfg = _with_fetched_file(arch, cfg, cache_dir)
            pretrained_cfg, pretrained_cfg_overlay, file = cfg, None, cfg.file
    with _weight_file_errors(file):
        model = timm.create_model(
            model_id, pretrained, pretrained_cfg=pretrained_cfg, pretrained_cfg_overlay=pretrained_cfg_overlay,
            cache_dir=cache_dir, **layer_config, **kwargs,
        )  # fmt: skip
    return _load_checkpoint_path(model, checkpoint_path, arch)
