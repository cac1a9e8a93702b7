"""``zoo.create_model``: timm's ``create_model`` with zoo's registry resolved first.

Every keyword of ``timm.create_model`` is accepted with the same meaning. For zoo architectures the
pretrained cfg comes from zoo's registry (a zoo class may share a timm name), and ``pretrained=True``
fetches the weight file up front (``file`` / ``state_dict`` / Hugging Face Hub / URL, as timm orders
them) so that a missing file offline is one clear error instead of a stack of network exceptions.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import timm
import torch.nn as nn
from timm.layers import set_layer_config
from timm.models import PretrainedCfg, load_checkpoint
from timm.models._hub import load_model_config_from_hf, load_model_config_from_path
from timm.models._pretrained import PretrainedCfg as _Cfg

from . import _registry
from ._registry import split_model_name_tag

__all__ = ["create_model", "parse_model_name", "PretrainedWeightsUnavailableError", "resolve_pretrained_cfg"]

_SOURCES = ("hf-hub", "local-dir")


class PretrainedWeightsUnavailableError(RuntimeError):
    """Pretrained weights were requested but no weight file can be had (offline, or not found)."""


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
        checkpoint_path: a timm-format checkpoint loaded strictly after the build (no filter).
        cache_dir: Hub / URL cache folder.
        scriptable, exportable, no_jit: timm layer config during the build.
        **kwargs: ``num_classes``, ``in_chans``, ``global_pool``, ``drop_rate``, ``drop_path_rate``,
            ``features_only``, ``out_indices``, ``feature_cls`` and any model argument; ``None`` values
            are dropped, as timm does.
    """
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    source, model_id = parse_model_name(model_name)
    if source is not None:
        if pretrained_cfg:
            raise ValueError(f"pretrained_cfg cannot be combined with a '{source}:' model name")
        if source == "hf-hub":
            cfg_dict, arch, model_args = load_model_config_from_hf(model_id, cache_dir=cache_dir)
        else:
            cfg_dict, arch, model_args = load_model_config_from_path(model_id)
        if not _registry.is_zoo_model(arch):
            return timm.create_model(
                model_name, pretrained, pretrained_cfg_overlay=pretrained_cfg_overlay,
                checkpoint_path=checkpoint_path, cache_dir=cache_dir, scriptable=scriptable,
                exportable=exportable, no_jit=no_jit, **kwargs,
            )  # fmt: skip
        kwargs = {**(model_args or {}), **kwargs}
        pretrained_cfg = _Cfg(**{k: v for k, v in cfg_dict.items() if k in _Cfg.__dataclass_fields__})
        arch_name = arch
    else:
        arch_name = split_model_name_tag(model_id)[0]
        if not _registry.is_zoo_model(arch_name):
            if not timm.is_model(arch_name):
                raise RuntimeError(_registry._unknown_model_message(model_id))
            return timm.create_model(
                model_id, pretrained, pretrained_cfg=pretrained_cfg,
                pretrained_cfg_overlay=pretrained_cfg_overlay, checkpoint_path=checkpoint_path,
                cache_dir=cache_dir, scriptable=scriptable, exportable=exportable, no_jit=no_jit, **kwargs,
            )  # fmt: skip

    cfg = resolve_pretrained_cfg(model_id if source is None else arch_name, pretrained_cfg, pretrained_cfg_overlay)
    if pretrained and cfg.state_dict is None and cfg.source != "local-dir" and not cfg.custom_load:
        # fetch first: offline, a missing file becomes one clear error naming the tag and the file
        tag_name = f"{arch_name}.{cfg.tag}" if cfg.tag else arch_name
        # source '' makes timm load the fetched file rather than go back to the Hub
        cfg = _Cfg(**{**cfg.to_dict(), "file": fetch_pretrained_file(tag_name, cfg, cache_dir), "source": ""})
    entry = _registry.get_entry(arch_name)
    with set_layer_config(scriptable=scriptable, exportable=exportable, no_jit=no_jit):
        if entry.kind == "backbone":
            model = entry.fn(pretrained=pretrained, pretrained_cfg=cfg, cache_dir=cache_dir, **kwargs)
        else:  # heads build from plain kwargs; their cfg is attached for cards and tools
            model = entry.fn(pretrained=pretrained, pretrained_cfg=cfg, **kwargs)
    # constructor options recorded as timm does, so an export can rebuild the same model
    model._model_args = dict(
        getattr(model, "_model_args", {}),
        **{k: v for k, v in kwargs.items() if k not in ("device", "dtype", "pretrained_model_args")},
    )
    if checkpoint_path:
        load_checkpoint(model, checkpoint_path)
    return model
