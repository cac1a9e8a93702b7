"""timm's model contract, checked for every backbone in zoo's registry.

Parametrised from ``zoo.list_models(kind='backbone')`` as timm's ``tests/test_models.py`` is from its
registry: registering a family adds it to this matrix with no extra code. Inputs are small (the cfg's
``min_input_size`` is respected); the cfg input size is used only where the contract names it
(``pool_size``). Variants too large for a 2-core CI runner are marked ``slow`` (``make test-slow``), and so are,
per test, the ones a test measured above ~3 s (``FX_SLOW``, ``COMPILE_SLOW``). Every route out of the zoo is
checked against eager: ``features_only``, timm's FX feature extraction, ``torch.export``, ``torch.compile``.
"""

from __future__ import annotations

import copy
import fnmatch
import math
from collections.abc import Sequence

import pytest
import safetensors.torch
import torch
from timm.models import FeatureGraphNet

import zoo

# Like timm's CI: the largest variants are only run on request (memory and time of a 2-core runner).
LARGE = ["*large*", "*huge*", "*giant*", "*_h5", "*_h6", "*_h7"]
BACKBONES = zoo.list_models(kind="backbone", exclude_filters=LARGE)
LARGE_BACKBONES = sorted(set(zoo.list_models(kind="backbone")) - set(BACKBONES))


def _params(slow: Sequence[str] = ()) -> list:
    """Every backbone; the large ones, and those matching a ``slow`` pattern (a test's own cost), marked slow."""
    return [
        pytest.param(n, id=n, marks=pytest.mark.slow)
        if any(fnmatch.fnmatch(n, p) for p in slow)
        else pytest.param(n, id=n)
        for n in BACKBONES
    ] + [pytest.param(n, id=n, marks=pytest.mark.slow) for n in LARGE_BACKBONES]


PARAMS = _params()

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
    """Every parameter gets a gradient; in zoo's own classes also what DDP and FSDP2 warn about on every rank.

    DDP compares each gradient's strides with its parameter's (size-1 dims included) and copies, warning, when
    they differ; FSDP2 warns when a wrapped block (``zoo.train`` shards every ``*Block``) returns a view. timm's
    classes (DaViT) are timm's to fix and are not checked for these two.
    """
    model = _create(name, num_classes=42).train()
    views = []
    hooks = [
        module.register_forward_hook(lambda m, args, out: views.append(type(m).__name__) if out._is_view() else None)
        for module in model.modules()
        if type(module).__name__.endswith("Block") and type(module).__module__.startswith("zoo.")
    ]
    x = torch.randn(BATCH, *_input_size(name, 64))
    out = model(x)
    for hook in hooks:
        hook.remove()
    assert out.shape == (BATCH, 42)
    out.mean().backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, f"parameters without gradient: {missing[:10]}"
    if not type(model).__module__.startswith("zoo."):
        return
    strided = [
        f"{n}: {tuple(p.stride())} vs grad {tuple(p.grad.stride())}"
        for n, p in model.named_parameters()
        if p.grad.stride() != p.stride()
    ]
    assert not strided, f"gradients strided unlike their parameters (DDP copies and warns): {strided[:5]}"
    assert not views, f"blocks returning views (FSDP2 warns on every rank): {sorted(set(views))}"


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


def _wrapper_free_key(key: str) -> str:
    """A state-dict key as every ``features_only`` wrapper of one model spells it: without the ``model.`` /
    ``graph_module.`` prefix, without ``.`` and ``_`` (``FeatureListNet`` flattens ``stages.0`` to ``stages_0``)."""
    for prefix in ("model.", "graph_module."):
        key = key.removeprefix(prefix)
    return key.replace(".", "").replace("_", "")


def _copy_weights(src: torch.nn.Module, dst: torch.nn.Module) -> None:
    """Load ``src``'s parameters and buffers into ``dst``, two feature wrappers of the same architecture."""
    by_key = {_wrapper_free_key(k): v for k, v in src.state_dict().items()}
    assert len(by_key) == len(src.state_dict()), "state-dict keys collide once normalised"
    missing = [k for k in dst.state_dict() if _wrapper_free_key(k) not in by_key]
    assert not missing, f"no source weight for {missing[:5]}"
    dst.load_state_dict({k: by_key[_wrapper_free_key(k)] for k in dst.state_dict()})


def _randomise_batch_norms(model: torch.nn.Module) -> None:
    """Non-trivial BatchNorm affine and statistics: zero-initialised last BNs (timm's ``zero_init_last``) would
    hide every residual branch from an output comparison."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.affine and m.track_running_stats:
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)


# > ~3 s each (measured on one core: 4.5-6 s, the model build dominates); the rest take 0.4-2.7 s
FX_SLOW = ["davit_small", "davit_base*"]


@pytest.mark.parametrize("name", _params(slow=FX_SLOW))
def test_fx_feature_extraction_matches_eager(name: str) -> None:
    """timm's FX feature extractor (``features_only=True, feature_cls='fx'``: ``FeatureGraphNet``, a torch.fx trace
    with timm's leaf modules and functions) builds and returns the eager ``features_only`` maps.

    Same weights (the eager model's, BatchNorms randomised, copied into the traced one), eval mode, the smallest
    input of the other tests (64 px, or the fixed size); fp32, 1e-5 (measured: bitwise equal).
    """
    x = torch.randn(1, *_input_size(name, 64))
    eager = zoo.create_model(name, features_only=True).eval()  # not _create: no cache to share, no deepcopy
    fx = zoo.create_model(name, features_only=True, feature_cls="fx").eval()
    assert isinstance(fx, FeatureGraphNet)
    _randomise_batch_norms(eager)
    _copy_weights(eager, fx)
    assert fx.feature_info.channels() == eager.feature_info.channels()
    assert fx.feature_info.reduction() == eager.feature_info.reduction()
    with torch.no_grad():
        expected, got = eager(x), fx(x)
    expected = list(expected.values()) if isinstance(expected, dict) else expected
    assert len(got) == len(expected) == len(fx.feature_info.channels())
    for level, (out, ref) in enumerate(zip(got, expected)):
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5, msg=lambda m, i=level: f"level {i}: {m}")


# Dynamo traces every block in Python: 3-12 s a model on one core. By default only the cheapest member of each
# forward code path runs (biformer_tiny 5.5 s, davit_tiny 4 s, halonet26t 3 s, lamhalobotnet50ts_256 5 s for the
# lambda / bottleneck-attention hybrids, medusa_resnet18 3.5 s); the rest repeat those blocks (the paper's
# halonet_h* only change widths) and run with `make test-slow`.
COMPILE_SLOW = [
    "biformer_base", "biformer_small", "biformer_stl", "davit_small", "davit_base*", "halonet_h*", "halonet50ts",
    "sehalonet33ts", "eca_halonext26ts", "haloregnetz_b", "halo2botnet50ts_256", "medusa_resnet50",
]  # fmt: skip


@pytest.mark.parametrize("name", _params(slow=COMPILE_SLOW))
def test_torch_compile_fullgraph(name: str) -> None:
    """``torch.compile(fullgraph=True)`` captures the whole eval forward (a graph break raises) and matches eager.

    ``aot_eager``: dynamo capture and AOT autograd tracing without code generation (inductor's C++ build takes
    about a minute per model on 2 cores); fp32, 1e-4 as ``test_torch_export``.
    """
    model = _create(name)
    x = torch.randn(1, *_input_size(name, 64))
    torch._dynamo.reset()  # no cache or recompile limit carried over from the previous model
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-4, atol=1e-4)
