"""timm's model contract, checked for every backbone in zoo's registry.

Parametrised from ``zoo.list_models(kind='backbone')`` as timm's ``tests/test_models.py`` is from its
registry: registering a family adds it to this matrix with no extra code. Inputs are small (the cfg's
``min_input_size`` is respected); the cfg input size is used only where the contract names it
(``pool_size``). Variants too large for a 2-core CI runner are marked ``slow`` (``make test-slow``).
"""

from __future__ import annotations

import copy
import math

import pytest
import safetensors.torch
import torch

import zoo

# Like timm's CI: the largest variants are only run on request (memory and time of a 2-core runner).
LARGE = ["*large*", "*huge*", "*giant*", "*_h5", "*_h6", "*_h7"]
BACKBONES = zoo.list_models(kind="backbone", exclude_filters=LARGE)
LARGE_BACKBONES = sorted(set(zoo.list_models(kind="backbone")) - set(BACKBONES))
PARAMS = [pytest.param(n, id=n) for n in BACKBONES] + [
    pytest.param(n, id=n, marks=pytest.mark.slow) for n in LARGE_BACKBONES
]

MAX_CFG_SIZE = 384  # the pool_size check runs at the cfg size, scaled down above this
SMALL = 96  # forward / features size target (timm uses 96 for features, 128 for backward)
BATCH = 2


def _input_size(name: str, target: int = SMALL) -> tuple[int, int, int]:
    """cfg input size shrunk to ``target`` unless the cfg sets a larger ``min_input_size`` or a fixed size."""
    cfg = zoo.get_pretrained_cfg(name)
    size = cfg.input_size
    if cfg.fixed_input_size:
        return size
    if cfg.min_input_size is not None and max(cfg.min_input_size[1:]) > target:
        return cfg.min_input_size
    return (size[0], min(size[1], target), min(size[2], target))


_BUILT: dict[tuple, torch.nn.Module] = {}


def _create(name: str, **kwargs) -> torch.nn.Module:
    """A fresh eval-mode model; builds are cached (weight init dominates small-input tests), callers get a copy."""
    key = (name, tuple(sorted(kwargs.items())))
    if key not in _BUILT:
        _BUILT.clear()  # keep one family member in memory at a time
        torch.manual_seed(0)
        _BUILT[key] = zoo.create_model(name, **kwargs).eval()
    return copy.deepcopy(_BUILT[key])


@pytest.mark.parametrize("name", PARAMS)
def test_forward_eval_and_grad_checkpointing(name: str) -> None:
    model = _create(name)
    x = torch.randn(1, *_input_size(name))
    with torch.no_grad():
        out = model(x)
    assert out.shape == (1, model.num_classes or model.head_hidden_size)  # encoder-only cfgs have 0 classes
    assert torch.isfinite(out).all()
    model.set_grad_checkpointing(True)
    with torch.no_grad():
        out_ckpt = model(x)
    torch.testing.assert_close(out_ckpt, out, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", PARAMS)
def test_backward_every_parameter_gets_a_gradient(name: str) -> None:
    model = _create(name, num_classes=42).train()
    x = torch.randn(BATCH, *_input_size(name, 64))
    out = model(x)
    assert out.shape == (BATCH, 42)
    out.mean().backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, f"parameters without gradient: {missing[:10]}"


@pytest.mark.parametrize("name", PARAMS)
def test_default_cfg_contract(name: str) -> None:
    """timm's test_model_default_cfgs: pool_size, num_features, head_hidden_size, reset_classifier, cfg names."""
    model = _create(name)
    cfg = model.pretrained_cfg
    assert model.num_classes >= 0 and model.num_features > 0 and model.head_hidden_size > 0
    # at the cfg input size, halved while above 384 px (Florence-2 towers run at 768); pool_size halves with it
    channels, *size = cfg["input_size"]
    pool_size = tuple(cfg["pool_size"])
    while max(size) > MAX_CFG_SIZE and all(s % 64 == 0 for s in size) and all(p % 2 == 0 for p in pool_size):
        size, pool_size = [s // 2 for s in size], tuple(p // 2 for p in pool_size)
    x = torch.randn(1, channels, *size)
    with torch.no_grad():
        feats = model.forward_features(x)
        assert feats.shape[1] == model.num_features
        assert tuple(feats.shape[-2:]) == pool_size
        assert model.forward_head(feats, pre_logits=True).shape == (1, model.head_hidden_size)
        model.reset_classifier(0)
        assert model.num_classes == 0
        assert model.forward_head(feats).shape == (1, model.head_hidden_size)
        model.reset_classifier(0, "")
        out = model.forward_head(feats)
        assert out.ndim == 4 and tuple(out.shape[-2:]) == pool_size
        model.reset_classifier(7, "avg")
        assert model.num_classes == 7 and model.forward_head(feats).shape == (1, 7)
    state_dict = _create(name).state_dict()
    for key in ("classifier", "first_conv") if cfg.get("num_classes") else ("first_conv",):  # encoders: no head
        names = cfg[key] if isinstance(cfg[key], (list, tuple)) else [cfg[key]]
        for module_name in names:
            assert f"{module_name}.weight" in state_dict, f"cfg {key}={module_name!r} names no weight"


@pytest.mark.parametrize("name", PARAMS)
def test_features_only(name: str) -> None:
    size = _input_size(name)
    x = torch.randn(1, *size)
    model = _create(name, features_only=True)
    info = model.feature_info
    outs = model(x)
    assert len(outs) == len(info.channels()) >= 3
    for out, channels, reduction in zip(outs, info.channels(), info.reduction()):
        assert out.shape[1] == channels
        for side, in_side in zip(out.shape[-2:], size[1:]):
            assert side <= math.ceil(in_side / reduction) + 1 and side >= in_side // reduction - 1
    # custom out_indices pick exactly those levels
    n_levels = len(info.channels())
    picked = (1, n_levels - 1)
    model_picked = _create(name, features_only=True, out_indices=picked)
    assert model_picked.feature_info.channels() == [info.channels()[i] for i in picked]
    outs_picked = model_picked(x)
    assert [o.shape[1] for o in outs_picked] == model_picked.feature_info.channels()
    with pytest.raises((AssertionError, IndexError, ValueError, RuntimeError)):
        _create(name, features_only=True, out_indices=(n_levels + 3,))


@pytest.mark.parametrize("name", PARAMS)
def test_forward_intermediates(name: str) -> None:
    model = _create(name)
    x = torch.randn(1, *_input_size(name))
    with torch.no_grad():
        features = model.forward_features(x)
        final, intermediates = model.forward_intermediates(x)
        torch.testing.assert_close(final, features, rtol=1e-5, atol=1e-5)
        info = model.feature_info
        assert len(intermediates) == len(info)
        for t, level in zip(intermediates, info):
            assert t.shape[1] == level["num_chs"]
        model.set_grad_checkpointing(True)
        final_ckpt, _ = model.forward_intermediates(x)
        torch.testing.assert_close(final_ckpt, features, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", PARAMS)
def test_conventional_kwargs_and_meta_device(name: str) -> None:
    """The keywords timm's create_model passes to every model (``drop_rate``, ``drop_path_rate``, ``global_pool``,
    ``device``): stochastic depth appears when asked, and ``device="meta"`` puts every tensor there."""
    from timm.layers import DropPath

    model = zoo.create_model(name, device="meta", drop_rate=0.1, drop_path_rate=0.1, global_pool="avg")
    assert {t.device.type for t in [*model.parameters(), *model.buffers()]} == {"meta"}
    assert any(isinstance(m, DropPath) for m in model.modules()), "drop_path_rate=0.1 added no DropPath"


@pytest.mark.parametrize("name", PARAMS)
def test_in_chans_1(name: str) -> None:
    model = _create(name, in_chans=1, num_classes=5)
    with torch.no_grad():
        out = model(torch.randn(1, 1, *_input_size(name)[1:]))
    assert out.shape == (1, 5)


@pytest.mark.parametrize("name", PARAMS)
def test_non_square_input_not_multiple_of_32(name: str) -> None:
    cfg = zoo.get_pretrained_cfg(name)
    base = max(_input_size(name)[1:])
    h, w = base - 13, base + 27  # neither side a multiple of 32 (nor of 7 or 8)
    model = _create(name)
    x = torch.randn(1, cfg.input_size[0], h, w)
    if cfg.fixed_input_size:
        with pytest.raises((AssertionError, ValueError, RuntimeError), match=r"\d"):
            model(x)
        return
    with torch.no_grad():
        out = model(x)
    assert out.shape == (1, model.num_classes or model.head_hidden_size) and torch.isfinite(out).all()


@pytest.mark.parametrize("name", PARAMS)
def test_state_dict_safetensors_round_trip(name: str, tmp_path) -> None:
    model = _create(name)
    path = tmp_path / "model.safetensors"
    safetensors.torch.save_model(model, str(path))
    twin = _create(name)
    with torch.no_grad():  # make the twin differ before loading
        for p in twin.parameters():
            p.add_(1.0)
    missing, unexpected = safetensors.torch.load_model(twin, str(path))
    assert not missing and not unexpected
    x = torch.randn(1, *_input_size(name))
    with torch.no_grad():
        assert torch.equal(model(x), twin(x))


@pytest.mark.parametrize("name", PARAMS)
def test_torch_export(name: str) -> None:
    model = _create(name)
    x = torch.randn(1, *_input_size(name, 64))
    exported = torch.export.export(model, (x,))
    with torch.no_grad():
        torch.testing.assert_close(exported.module()(x), model(x), rtol=1e-4, atol=1e-4)
