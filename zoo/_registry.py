"""Zoo's model registry, layered on top of timm's.

Zoo keeps its own table of architectures (entrypoint, kind, pretrained cfgs) so that a zoo class may
carry the same name as a timm class (zoo's ``halonet26t`` runs on zoo's kernels, timm's keeps timm's
``HaloAttn``) without either replacing the other:

* zoo names resolve first, then timm's (``create_model``, ``is_model``, ``get_pretrained_cfg``);
* an image backbone whose name timm does not use is also registered into timm's registry, so
  ``import zoo; timm.create_model('<zoo arch>')`` works; a name timm already uses is never touched. Heads,
  probes and scanpath models are not: timm's tools (benchmark, validate, its test suite) would take them for
  image backbones. They are reached through ``zoo.create_model`` and ``zoo.list_models(kind=...)``.

Pretrained cfgs follow timm exactly: ``default_cfgs = generate_default_cfgs({'arch.tag': cfg})`` in the
family module, first tag with weights (or a tag ending in ``*``) is the default.

Every entry carries a *kind*: ``backbone`` (timm's model contract), ``mil_head``, ``probe`` or
``scanpath`` (each with its own small contract, see ``KINDS``).
"""

from __future__ import annotations

import difflib
import fnmatch
import functools
import sys
import warnings
from collections.abc import Callable, Iterable
from copy import deepcopy
from dataclasses import dataclass, field, replace
from typing import Any

import timm
from timm.models import PretrainedCfg
from timm.models._pretrained import DefaultCfg
from timm.models._registry import _natural_key, split_model_name_tag

__all__ = [
    "KINDS",
    "ZooEntry",
    "register_model",
    "register_external",
    "list_models",
    "list_pretrained",
    "list_kinds",
    "is_model",
    "is_zoo_model",
    "is_model_pretrained",
    "model_entrypoint",
    "model_kind",
    "get_entry",
    "get_pretrained_cfg",
    "get_pretrained_cfg_value",
    "get_arch_pretrained_cfgs",
    "split_model_name_tag",
    "close_model_names",
    "restore_timm",
    "timm_entrypoint_of",
    "use_zoo_in_timm",
]

# What each kind of entry promises; the contract tests in tests/ are parametrised over each kind.
KINDS: dict[str, str] = {
    "backbone": "timm's model contract: forward_features/forward_head, reset_classifier, feature_info, "
    "forward_intermediates, features_only, grad checkpointing (tests/models/test_conformance.py)",
    "mil_head": "bag (N, D) or (B, N, D) + optional padding mask -> dict with 'logits' (B, num_classes) and "
    "'attention'; built with in_dim= and num_classes=",
    "probe": "frozen tokens (B, N, D) -> logits (B, num_classes); built with embed_dim= and num_classes=",
    "scanpath": "display tokens + target -> pointer logits over objects; built with its own kwargs",
}


@dataclass
class ZooEntry:
    """One architecture in zoo's registry."""

    name: str
    fn: Callable[..., Any]
    kind: str
    module: str
    default_cfg: DefaultCfg | None = None
    in_timm: bool = False  # True when timm.create_model(name) builds *this* entry
    pretrained_cfgs: dict[str, PretrainedCfg] = field(default_factory=dict)  # '' / tag -> cfg


_entries: dict[str, ZooEntry] = {}
_pretrained_cfgs: dict[str, PretrainedCfg] = {}  # 'arch' (default tag) and 'arch.tag' -> cfg
_has_pretrained: set[str] = set()
_with_tags: dict[str, list[str]] = {}


def _normalise_default_cfg(default_cfg: DefaultCfg | dict | None) -> DefaultCfg | None:
    if default_cfg is None or isinstance(default_cfg, DefaultCfg):
        return default_cfg
    # old-style single dict per architecture, as timm accepts
    cfg = PretrainedCfg(**default_cfg)
    return DefaultCfg(tags=[""], cfgs={"": cfg})


def _remove_entry(name: str) -> None:
    """Forget an architecture and its cfgs (zoo's registry only)."""
    _entries.pop(name, None)
    for key in _with_tags.pop(name, []):
        _pretrained_cfgs.pop(key, None)
        _has_pretrained.discard(key)
    _pretrained_cfgs.pop(name, None)
    _has_pretrained.discard(name)


def _add_entry(entry: ZooEntry) -> None:
    name = entry.name
    if name in _entries:
        warnings.warn(f"zoo: overwriting registry entry {name!r} with {entry.module}.{name}", stacklevel=3)
        _remove_entry(name)
    _entries[name] = entry
    _with_tags[name] = []
    default_cfg = entry.default_cfg
    if default_cfg is None:
        return
    # same resolution as timm's register_model: first tag is the default, 'timm/' hub ids auto-complete
    for tag_idx, tag in enumerate(default_cfg.tags):
        name_tag = f"{name}.{tag}" if tag else name
        cfg = default_cfg.cfgs[tag]
        updates: dict[str, Any] = dict(architecture=name, tag=tag or None)
        if cfg.hf_hub_id and cfg.hf_hub_id.endswith("/"):
            updates["hf_hub_id"] = cfg.hf_hub_id + name_tag
        cfg = replace(cfg, **updates)
        entry.pretrained_cfgs[tag] = cfg
        if tag_idx == 0:
            _pretrained_cfgs[name] = cfg
            if cfg.has_weights:
                _has_pretrained.add(name)
        if tag:
            _pretrained_cfgs[name_tag] = cfg
            if cfg.has_weights:
                _has_pretrained.add(name_tag)
        _with_tags[name].append(name_tag)


def register_model(fn: Callable[..., Any] | None = None, *, kind: str = "backbone"):
    """Register a model entrypoint in zoo's registry (and a backbone in timm's when timm has no such name).

    Use as ``@register_model`` or ``@register_model(kind='mil_head')``. The pretrained cfgs are read from
    ``default_cfgs`` of the function's module, keyed ``arch`` / ``arch.tag`` as in timm.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown registry kind {kind!r}; expected one of {sorted(KINDS)}")

    def _register(fn: Callable[..., Any]) -> Callable[..., Any]:
        module = sys.modules[fn.__module__]
        name = fn.__name__
        default_cfg = _normalise_default_cfg(getattr(module, "default_cfgs", {}).get(name))
        in_timm = False
        if kind == "backbone" and not timm.is_model(name):
            # timm reads the same module-level default_cfgs, so both registries agree on tags
            timm.models.register_model(_timm_entrypoint(fn))
            in_timm = True
        _add_entry(ZooEntry(name, fn, kind, fn.__module__, default_cfg, in_timm=in_timm))
        return fn

    return _register(fn) if fn is not None else _register


def _timm_entrypoint(fn: Callable[..., Any]) -> Callable[..., Any]:
    """What timm's registry calls for a zoo-only name: zoo's argument checks and weight fetching, then ``fn``.

    Without it ``import zoo; timm.create_model('<zoo arch>', pretrained=True)`` goes straight to timm's loader
    (offline: a bare URLError; share links of every variant cached under one file name 'content').
    """

    @functools.wraps(fn)  # timm registers by __name__ / __module__ and reads that module's default_cfgs
    def entry(pretrained: bool = False, **kwargs: Any) -> Any:
        from ._factory import call_timm_entrypoint  # late: _factory imports this module

        return call_timm_entrypoint(fn, pretrained, kwargs)

    return entry


_timm_originals: dict[str, Callable[..., Any]] = {}  # timm's own entrypoints replaced by use_zoo_in_timm


def use_zoo_in_timm(patterns: str | Iterable[str] = "*") -> list[str]:
    """Opt-in: ``timm.create_model(name)`` builds zoo's class for the zoo architectures that share a timm name.

    zoo never replaces a timm entry by default: ``timm.create_model('halonet26t')`` is timm's class, which
    needs inputs in multiples of its block grid. Users of timm's API (segmentation_models_pytorch ``tu-``
    encoders, Hugging Face, timm's scripts) who want zoo's any-size HaloNets under timm's names call this (or
    set ``ZOO_IN_TIMM=halonet*`` before ``import zoo``). zoo's classes load timm's checkpoints unchanged.

    Args:
        patterns: fnmatch pattern(s) over zoo's architecture names, e.g. ``'halonet*'``.

    Returns:
        the names now built by zoo through timm. ``restore_timm()`` undoes it.
    """
    from timm.models import _registry as timm_registry

    patterns = [patterns] if isinstance(patterns, str) else list(patterns)
    switched = []
    for name, entry in _entries.items():
        if entry.in_timm or entry.kind != "backbone" or not timm.is_model(name):
            continue  # zoo-only names are in timm already; heads never go there
        if not any(fnmatch.fnmatch(name, p) for p in patterns):
            continue
        _timm_originals.setdefault(name, timm_registry._model_entrypoints[name])
        timm_registry._model_entrypoints[name] = _timm_entrypoint(entry.fn)
        switched.append(name)
    return switched


def restore_timm() -> list[str]:
    """Undo ``use_zoo_in_timm``: timm's own entrypoints again; returns the names restored."""
    from timm.models import _registry as timm_registry

    names = list(_timm_originals)
    for name in names:
        timm_registry._model_entrypoints[name] = _timm_originals.pop(name)
    return names


def timm_entrypoint_of(name: str) -> Callable[..., Any] | None:
    """timm's own entrypoint of ``name`` (even while ``use_zoo_in_timm`` replaced it); None if timm has none."""
    from timm.models import _registry as timm_registry

    return _timm_originals.get(name) or timm_registry._model_entrypoints.get(name)


def register_external(
    name: str,
    fn: Callable[..., Any],
    default_cfg: DefaultCfg | dict | None,
    *,
    kind: str = "backbone",
    module: str,
) -> None:
    """List an architecture that another library implements (timm's DaViT) in zoo's registry.

    Zoo does not rewrite such a family: the entry points at the library's own entrypoint and cfgs.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown registry kind {kind!r}; expected one of {sorted(KINDS)}")
    entry = ZooEntry(
        name, fn, kind, module, _normalise_default_cfg(default_cfg), in_timm=timm.models.model_entrypoint(name) is fn
    )
    _add_entry(entry)


def _to_list(value: str | Iterable[str] | None) -> list[str]:
    if not value:
        return []
    return [value] if isinstance(value, str) else list(value)


def _expand_filter(pattern: str) -> list[str]:
    base, tag = split_model_name_tag(pattern)
    return [pattern] if tag else [f"{base}.*", pattern]


def list_models(
    filter: str | Iterable[str] = "",
    module: str | Iterable[str] = "",
    pretrained: bool = False,
    exclude_filters: str | Iterable[str] = "",
    name_matches_cfg: bool = False,
    include_tags: bool | None = None,
    kind: str | Iterable[str] | None = None,
) -> list[str]:
    """Names in zoo's registry, sorted naturally, with timm's ``list_models`` semantics.

    Args:
        filter: fnmatch pattern(s), e.g. ``'davit*'`` or ``['*mil*', 'biformer*']``.
        module: limit to family module(s) by short name (``'davit'``, ``'biformer'``).
        pretrained: only names with a weight source (``url`` / ``hf_hub_id`` / ``file``).
        exclude_filters: fnmatch pattern(s) removed after ``filter``.
        name_matches_cfg: only names that have a pretrained cfg.
        include_tags: list ``arch.tag`` names; defaults to ``pretrained``.
        kind: limit to entries of this kind (or kinds): ``backbone``, ``mil_head``, ``probe``, ``scanpath``.

    timm's own architectures are not listed here (``timm.list_models`` lists them); ``zoo.create_model``
    still builds them.
    """
    kinds = _to_list(kind)
    for k in kinds:
        if k not in KINDS:
            raise ValueError(f"unknown kind {k!r}; expected one of {sorted(KINDS)}")
    modules = {m.split(".")[-1] for m in _to_list(module)}
    include_filters, exclude = _to_list(filter), _to_list(exclude_filters)
    include_tags = pretrained if include_tags is None else include_tags

    names = {
        n
        for n, e in _entries.items()
        if (not kinds or e.kind in kinds) and (not modules or e.module.split(".")[-1] in modules)
    }
    if include_tags:
        names = {t for n in names for t in (_with_tags.get(n) or [n])}
        include_filters = [f for p in include_filters for f in _expand_filter(p)]
        exclude = [f for p in exclude for f in _expand_filter(p)]
    if include_filters:
        names = {n for n in names if any(fnmatch.fnmatch(n, f) for f in include_filters)}
    if exclude:
        names = {n for n in names if not any(fnmatch.fnmatch(n, f) for f in exclude)}
    if pretrained:
        names &= _has_pretrained
    if name_matches_cfg:
        names &= set(_pretrained_cfgs)
    return sorted(names, key=_natural_key)


def list_pretrained(filter: str | Iterable[str] = "", exclude_filters: str | Iterable[str] = "") -> list[str]:
    """``arch.tag`` names in zoo's registry that have a weight source."""
    return list_models(filter, pretrained=True, exclude_filters=exclude_filters, include_tags=True)


def list_kinds() -> list[str]:
    return sorted(KINDS)


def is_zoo_model(model_name: str) -> bool:
    """True when ``model_name`` (tag ignored) is in zoo's registry."""
    return split_model_name_tag(model_name)[0] in _entries


def is_model(model_name: str) -> bool:
    """True when ``zoo.create_model(model_name)`` can build it: zoo's registry first, then timm's."""
    return is_zoo_model(model_name) or timm.is_model(model_name)


def get_entry(model_name: str) -> ZooEntry:
    arch = split_model_name_tag(model_name)[0]
    if arch not in _entries:
        raise KeyError(_unknown_model_message(model_name))
    return _entries[arch]


def model_kind(model_name: str) -> str:
    """Kind of a zoo entry; timm architectures are backbones."""
    return get_entry(model_name).kind if is_zoo_model(model_name) else "backbone"


def model_entrypoint(model_name: str) -> Callable[..., Any]:
    """Entrypoint function for a name (tag ignored), zoo's first, then timm's."""
    if is_zoo_model(model_name):
        return get_entry(model_name).fn
    if timm.is_model(model_name):
        return timm.models.model_entrypoint(model_name)
    raise RuntimeError(_unknown_model_message(model_name))


def is_model_pretrained(model_name: str) -> bool:
    if is_zoo_model(model_name):
        return model_name in _has_pretrained
    return timm.models.is_model_pretrained(model_name)


def get_pretrained_cfg(model_name: str, allow_unregistered: bool = True) -> PretrainedCfg | None:
    """A copy of the pretrained cfg for ``arch`` (default tag) or ``arch.tag``; zoo first, then timm.

    Raises:
        RuntimeError: the architecture exists but has no such tag (the message lists its tags).
    """
    arch, tag = split_model_name_tag(model_name)
    if arch not in _entries:
        return timm.models.get_pretrained_cfg(model_name, allow_unregistered=allow_unregistered)
    if model_name in _pretrained_cfgs:
        return deepcopy(_pretrained_cfgs[model_name])
    if _with_tags.get(arch):
        raise RuntimeError(f"invalid pretrained tag {tag!r} for {arch}; available: {', '.join(_with_tags[arch])}")
    if allow_unregistered:
        return None
    raise RuntimeError(f"model architecture {arch} has no pretrained cfg registered")


def get_pretrained_cfg_value(model_name: str, cfg_key: str) -> Any:
    cfg = get_pretrained_cfg(model_name, allow_unregistered=False)
    return getattr(cfg, cfg_key, None)


def get_arch_pretrained_cfgs(model_name: str) -> dict[str, PretrainedCfg]:
    """All ``arch.tag`` cfgs of an architecture (copies)."""
    arch = split_model_name_tag(model_name)[0]
    if arch not in _entries:
        return timm.models.get_arch_pretrained_cfgs(model_name)
    return {t: deepcopy(_pretrained_cfgs[t]) for t in _with_tags.get(arch, []) if t in _pretrained_cfgs}


def close_model_names(name: str, n: int = 5) -> list[str]:
    """Up to ``n`` zoo and timm architecture names close to ``name`` (tag ignored), best first, each once.

    Zoo-only names are also in timm's registry: the candidates are deduplicated before matching.
    """
    known = list(dict.fromkeys([*_entries, *timm.list_models()]))
    return difflib.get_close_matches(split_model_name_tag(name)[0].strip().lower(), known, n=n, cutoff=0.6)


def _unknown_model_message(model_name: str) -> str:
    close = close_model_names(model_name)
    hint = f" Did you mean: {', '.join(close)}?" if close else " See `zoo list` or zoo.list_models()."
    return f"unknown model {model_name!r}: not in zoo's registry nor in timm's.{hint}"
