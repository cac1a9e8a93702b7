"""zoo's HaloNets: timm parity (strict state-dict load, equal outputs), any input size, padding semantics,
feature levels, the paper's H0-H7 family, and that timm's own models stay timm's.

Model-level tests run at batch 1 in eval mode; the layer-level tests use tiny maps against a brute-force
definition of halo attention written here (independent of timm's unfold and of zoo's op).
"""

from __future__ import annotations

import copy
import math

import pytest
import timm
import torch
from timm.layers.halo_attn import HaloAttn
from timm.models import FeatureGraphNet, FeatureListNet

import zoo
import zoo.models.halonet as halonet  # until zoo.models imports it
from zoo.models.halonet import PAPER_PARAMS_M, HaloNet, ZooHaloAttn, checkpoint_filter_fn

TIMM_HALO = [
    "halonet26t", "sehalonet33ts", "halonet50ts", "eca_halonext26ts", "haloregnetz_b", "lamhalobotnet50ts_256",
    "halo2botnet50ts_256", "halonet_h1",
]  # fmt: skip
PAPER = [f"halonet_h{i}" for i in range(8)]
# timm runs a model only where every halo map is a multiple of its block: 256k (b=8 at stride 32), 224k (b=7)
BASE_SIZE = {"haloregnetz_b": 224}
FIXED = {"lamhalobotnet50ts_256", "halo2botnet50ts_256"}  # stage-4 bottleneck attention: 256 px only
# twice the base size for the two fastest; the rest is the same code path at a larger map (slow on 2 cores)
FAST_2X = {"halonet26t", "eca_halonext26ts"}

PARITY = [pytest.param(n, BASE_SIZE.get(n, 256), id=f"{n}-{BASE_SIZE.get(n, 256)}") for n in TIMM_HALO] + [
    pytest.param(n, 2 * BASE_SIZE.get(n, 256), id=f"{n}-{2 * BASE_SIZE.get(n, 256)}", marks=() if n in FAST_2X
                 else pytest.mark.slow)
    for n in TIMM_HALO
    if n not in FIXED
]  # fmt: skip


def _randomise_norms(model: torch.nn.Module) -> None:
    """Non-trivial BatchNorm affine and statistics: timm zero-inits each residual's last BN, which would hide
    the attention branch from an output comparison."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)


# ------------------------------------------------------------------------------------------- registry


def test_timm_models_stay_timm_and_zoo_names_resolve_to_zoo() -> None:
    timm_model = timm.create_model("halonet26t")
    assert any(type(m) is HaloAttn for m in timm_model.modules())
    assert not any(isinstance(m, ZooHaloAttn) for m in timm_model.modules())
    zoo_model = zoo.create_model("halonet26t")
    assert isinstance(zoo_model, HaloNet)
    assert not any(type(m) is HaloAttn for m in zoo_model.modules())
    assert sum(isinstance(m, ZooHaloAttn) for m in zoo_model.modules()) == 3
    # names timm lacks are registered into timm too, and build zoo's class there
    assert timm.models.model_entrypoint("halonet_h1").__module__ == "timm.models.byoanet"
    assert isinstance(timm.create_model("halonet_h0", device="meta"), HaloNet)
    assert set(zoo.list_models("*halo*")) >= set(TIMM_HALO) | set(PAPER)


def test_cfgs_take_any_size_and_keep_timm_data_settings() -> None:
    for name in TIMM_HALO:
        cfg, timm_cfg = zoo.get_pretrained_cfg(name), timm.models.get_pretrained_cfg(name)
        assert cfg.min_input_size is None
        assert (cfg.input_size, cfg.pool_size, cfg.crop_pct, cfg.mean, cfg.url, cfg.hf_hub_id) == (
            timm_cfg.input_size, timm_cfg.pool_size, timm_cfg.crop_pct, timm_cfg.mean, timm_cfg.url, timm_cfg.hf_hub_id
        )  # fmt: skip
        assert cfg.fixed_input_size == (name in FIXED)


# --------------------------------------------------------------------------------------- timm parity


@pytest.mark.parametrize("name, size", PARITY)
def test_timm_state_dict_loads_strictly_and_outputs_match(name: str, size: int) -> None:
    reference = timm.create_model(name).eval()
    _randomise_norms(reference)
    model = zoo.create_model(name).eval()
    model.load_state_dict(reference.state_dict(), strict=True)
    x = torch.randn(1, 3, size, size)
    with torch.no_grad():
        expected = reference(x)
        torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)
        # the attention path is live: masking the border halo changes the logits
        model.set_halo_pad_mask(True)
        assert (model(x) - expected).abs().max() > 1e-4


def test_pretrained_file_in_timm_format_loads_through_the_filter(tmp_path) -> None:
    reference = timm.create_model("eca_halonext26ts").eval()
    _randomise_norms(reference)
    path = tmp_path / "eca_halonext26ts.pth"
    torch.save({"state_dict": reference.state_dict()}, path)
    model = zoo.create_model("eca_halonext26ts", pretrained=True, pretrained_cfg_overlay=dict(file=str(path))).eval()
    x = torch.randn(1, 3, 256, 256)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), rtol=1e-5, atol=1e-5)
    filtered = checkpoint_filter_fn({"model": reference.state_dict()}, model)
    assert checkpoint_filter_fn(filtered, model).keys() == reference.state_dict().keys()  # idempotent


# ------------------------------------------------------------------------------ layer: any size, masking


def _brute_force_halo(layer: HaloAttn, x: torch.Tensor, pad_mask: bool) -> torch.Tensor:
    """Halo attention by its definition, one query at a time: the window of block (i, j) is key rows
    ``i*b - h .. i*b + b + h - 1`` (cols alike); keys outside the map are zero vectors (``pad_mask=False``) or
    absent (``True``); logits ``q.k * scale + q.height_rel[ky - qy + win - 1] + q.width_rel[kx - qx + win - 1]``."""
    B, _, H, W = x.shape
    nh, dq, dv = layer.num_heads, layer.dim_head_qk, layer.dim_head_v
    b, h, s = layer.block_size, layer.halo_size, layer.block_stride
    bq, win = b // s, b + 2 * h
    q = layer.q(x).view(B, nh, dq, -(-H // s), -(-W // s))
    kv = layer.kv(x).view(B, nh, dq + dv, H, W)
    k, v = kv[:, :, :dq], kv[:, :, dq:]
    rel_h, rel_w = layer.pos_embed.height_rel, layer.pos_embed.width_rel
    out = torch.zeros(B, nh, dv, q.shape[-2], q.shape[-1])
    for y in range(q.shape[-2]):
        for x_ in range(q.shape[-1]):
            qy, qx = y % bq, x_ % bq
            rows = [(y // bq) * b - h + ky for ky in range(win)]
            cols = [(x_ // bq) * b - h + kx for kx in range(win)]
            logits, values = [], []
            query = q[:, :, :, y, x_]  # (B, nh, dq)
            for ky, r in enumerate(rows):
                for kx, c in enumerate(cols):
                    inside = 0 <= r < H and 0 <= c < W
                    if not inside and pad_mask:
                        continue
                    key = k[:, :, :, r, c] if inside else torch.zeros(B, nh, dq)
                    rel = query @ rel_h[ky - qy + win - 1] + query @ rel_w[kx - qx + win - 1]
                    logits.append((query * key).sum(-1) * layer.scale + rel)
                    values.append(v[:, :, :, r, c] if inside else torch.zeros(B, nh, dv))
            attn = torch.stack(logits, -1).softmax(-1)  # (B, nh, n_keys)
            out[:, :, :, y, x_] = (attn[:, :, None, :] * torch.stack(values, -1)).sum(-1)
    return layer.pool(out.reshape(B, nh * dv, *out.shape[-2:]))


def _layer_pair(stride: int, block_size: int = 4, halo_size: int = 1) -> tuple[HaloAttn, ZooHaloAttn]:
    timm_layer = HaloAttn(16, stride=stride, num_heads=2, block_size=block_size, halo_size=halo_size).eval()
    zoo_layer = ZooHaloAttn(16, stride=stride, num_heads=2, block_size=block_size, halo_size=halo_size).eval()
    zoo_layer.load_state_dict(timm_layer.state_dict(), strict=True)
    return timm_layer, zoo_layer


@pytest.mark.parametrize("stride", [1, 2])
def test_layer_at_block_multiples_equals_timm_and_the_definition(stride: int) -> None:
    timm_layer, zoo_layer = _layer_pair(stride)
    x = torch.randn(2, 16, 8, 12)
    with torch.no_grad():
        expected = timm_layer(x)
        torch.testing.assert_close(zoo_layer(x), expected, rtol=1e-5, atol=1e-5)  # auto: no padding, timm's
        torch.testing.assert_close(_brute_force_halo(timm_layer, x, pad_mask=False), expected, rtol=1e-5, atol=1e-5)
        zoo_layer.pad_mask = True
        masked = zoo_layer(x)
        torch.testing.assert_close(masked, _brute_force_halo(timm_layer, x, pad_mask=True), rtol=1e-5, atol=1e-5)
    # masking changes the border blocks only; here every block touches the border, so compare a 3x3 grid
    timm_layer, zoo_layer = _layer_pair(1)
    x = torch.randn(1, 16, 12, 12)
    with torch.no_grad():
        expected = timm_layer(x)
        zoo_layer.pad_mask = True
        masked = zoo_layer(x)
    torch.testing.assert_close(masked[..., 4:8, 4:8], expected[..., 4:8, 4:8], rtol=1e-5, atol=1e-5)
    assert (masked - expected).abs().amax(dim=(0, 1))[:4].max() > 1e-4


@pytest.mark.parametrize("stride", [1, 2])
def test_layer_any_size_pads_to_the_block_grid_and_masks_the_padding(stride: int) -> None:
    timm_layer, zoo_layer = _layer_pair(stride)
    x = torch.randn(1, 16, 10, 13)  # neither side a multiple of the block (4)
    with pytest.raises(AssertionError):
        timm_layer(x)
    with torch.no_grad():
        auto = zoo_layer(x)
        assert auto.shape == (1, 16, math.ceil(10 / stride), math.ceil(13 / stride))
        torch.testing.assert_close(auto, _brute_force_halo(timm_layer, x, pad_mask=True), rtol=1e-5, atol=1e-5)
        zoo_layer.pad_mask = False  # timm's zero keys, extended to the completion padding
        torch.testing.assert_close(zoo_layer(x), _brute_force_halo(timm_layer, x, pad_mask=False), rtol=1e-5, atol=1e-5)


def test_layer_odd_block_with_stride_pools_like_the_strided_convs() -> None:
    # b=7 cannot stride queries by 2: timm avg-pools the output; zoo rounds up on odd maps as the shortcut does
    timm_layer, zoo_layer = _layer_pair(2, block_size=7, halo_size=2)
    x = torch.randn(1, 16, 14, 14)
    with torch.no_grad():
        torch.testing.assert_close(zoo_layer(x), timm_layer(x), rtol=1e-5, atol=1e-5)
        assert zoo_layer(torch.randn(1, 16, 15, 9)).shape[-2:] == (8, 5)


def test_attn_backend_reaches_every_halo_layer(monkeypatch) -> None:
    """The ``attn_backend`` model kwarg (and ``set_attn_backend``) is what every halo layer passes to
    ``zoo.ops.halo_attention``; None leaves the choice to the dispatch ("auto")."""
    model = zoo.create_model("halonet26t", num_classes=10, attn_backend="torch").eval()
    layers = [m for m in model.modules() if isinstance(m, ZooHaloAttn)]
    assert layers and all(m.attn_backend == "torch" for m in layers)
    asked = []
    real = halonet.ops.halo_attention

    def spy(*args, backend, **kwargs):
        asked.append(backend)
        return real(*args, backend=backend, **kwargs)

    monkeypatch.setattr(halonet.ops, "halo_attention", spy)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        out = model(x)
        assert asked == ["torch"] * len(layers)
        model.set_attn_backend(None)
        torch.testing.assert_close(model(x), out)  # on CPU, auto is the reference too
        assert asked[len(layers) :] == ["auto"] * len(layers)
        model.set_attn_backend("no_such_backend")
        with pytest.raises(zoo.ops.BackendUnavailableError, match="no_such_backend"):
            model(x)


def test_recompute_gives_the_same_gradients() -> None:
    _, zoo_layer = _layer_pair(2)
    zoo_layer.train()
    x = torch.randn(2, 16, 10, 13, requires_grad=True)
    grads = []
    for recompute in (False, True):
        zoo_layer.recompute = recompute
        zoo_layer.zero_grad()
        x.grad = None
        out = zoo_layer(x)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        grads.append([x.grad.clone()] + [p.grad.clone() for p in zoo_layer.parameters()])
    for plain, recomputed in zip(*grads):
        torch.testing.assert_close(recomputed, plain, rtol=1e-5, atol=1e-6)


def test_lean_norm_act_keeps_timms_numerics_and_saves_less(saved_bytes) -> None:
    """Training step of halonet50ts (SiLU): zoo's lean BN-act / block tails vs timm's model, same weights."""
    torch.manual_seed(0)
    ref = timm.create_model("halonet50ts").train()
    ours = zoo.create_model("halonet50ts").train()
    ours.load_state_dict(ref.state_dict(), strict=True)
    assert {type(m).__name__ for m in ours.modules()} >= {"LeanBatchNormAct2d", "LeanBottleneckBlock"}
    x = torch.randn(1, 3, 256, 256)
    steps = []
    for model in (ref, ours):
        saved = {}

        def step(model=model, saved=saved) -> None:
            saved["out"] = model(x)

        saved["bytes"] = saved_bytes(step)
        (saved["out"] * torch.linspace(-1, 1, 1000)).sum().backward()
        grads = {k: p.grad for k, p in model.named_parameters()}
        steps.append((saved["out"].detach(), grads, dict(model.named_buffers()), saved["bytes"]))
    (out_ref, g_ref, b_ref, saved_ref), (out_ours, g_ours, b_ours, saved_ours) = steps
    assert torch.equal(out_ours, out_ref), "forward in training mode must be bitwise timm's"
    assert all(torch.equal(b_ours[k], b_ref[k]) for k in b_ref), "running statistics must update as timm's"
    scale = max(g.abs().max() for g in g_ref.values())
    for k in g_ref:
        torch.testing.assert_close(g_ours[k], g_ref[k], rtol=0, atol=1e-5 * scale)
    assert saved_ours < 0.8 * saved_ref, (saved_ours, saved_ref)  # measured 0.75


# ------------------------------------------------------------------------------------- model: any size


@pytest.mark.parametrize("size", [(224, 224), (320, 320), (250, 333)])
def test_model_takes_any_input_size(size: tuple[int, int]) -> None:
    model = zoo.create_model("eca_halonext26ts", num_classes=10).eval()
    with torch.no_grad():
        features = model.forward_features(torch.randn(1, 3, *size))
        out = model.forward_head(features)
    assert features.shape[-2:] == tuple(math.ceil(s / 32) for s in size)
    assert out.shape == (1, 10) and torch.isfinite(out).all()


def test_fixed_size_hybrid_names_the_size_it_needs() -> None:
    model = zoo.create_model("halo2botnet50ts_256").eval()
    with pytest.raises(ValueError, match="256x256"):
        model(torch.randn(1, 3, 224, 224))


@pytest.mark.parametrize("name", sorted(FIXED))
def test_fixed_size_hybrid_fx_features_and_size_check(name: str) -> None:
    """timm's FX feature extractor traces the fixed-size hybrids (the size check is a leaf: it compares sizes when
    the graph runs, not the Proxies of the trace) and returns the eager ``features_only`` maps (fp32, 1e-5); the
    traced graph still names the size it needs. Built at ``img_size=64``: the same layers at a cheap size."""
    torch.manual_seed(0)
    model = zoo.create_model(name, img_size=64).eval()
    _randomise_norms(model)
    levels = tuple(range(len(model.feature_info)))
    eager = FeatureListNet(copy.deepcopy(model), levels, flatten_sequential=True).eval()  # as features_only=True
    fx = FeatureGraphNet(copy.deepcopy(model), levels).eval()  # as features_only=True, feature_cls="fx"
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        for out, ref in zip(fx(x), eager(x), strict=True):
            torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
        with pytest.raises(ValueError, match="input 96x64 .* resize the input to 64x64"):
            fx(torch.randn(1, 3, 96, 64))


@pytest.mark.parametrize("name", ["halonet26t", "haloregnetz_b", "halonet_h0"])
def test_features_only_five_levels_at_strides_2_to_32(name: str) -> None:
    model = zoo.create_model(name, features_only=True).eval()
    assert model.feature_info.reduction() == [2, 4, 8, 16, 32]
    with torch.no_grad():
        outs = model(torch.randn(1, 3, 100, 72))
    assert [tuple(o.shape[-2:]) for o in outs] == [(math.ceil(100 / r), math.ceil(72 / r)) for r in (2, 4, 8, 16, 32)]
    assert [o.shape[1] for o in outs] == model.feature_info.channels()


# ------------------------------------------------------------------------------------------ paper family


@pytest.mark.parametrize("name", PAPER)
def test_paper_variant_params_within_5_percent(name: str) -> None:
    model = zoo.create_model(name, device="meta")
    params = sum(p.numel() for p in model.parameters()) / 1e6
    assert abs(params / PAPER_PARAMS_M[name] - 1) < 0.05, f"{name}: {params:.2f} M vs paper {PAPER_PARAMS_M[name]} M"


# b, h, r_v, r_b, stage-3 depth, d_f, train resolution (the spec's second-hand table)
PAPER_TABLE = {
    "halonet_h0": (8, 3, 1.0, 0.5, 7, 0, 256),
    "halonet_h2": (8, 3, 1.0, 1.25, 11, 0, 256),
    "halonet_h3": (10, 3, 1.0, 1.5, 12, 1024, 320),
    "halonet_h4": (12, 2, 1.0, 3.0, 12, 1280, 384),
    "halonet_h5": (14, 2, 2.5, 2.0, 23, 1536, 448),
    "halonet_h6": (8, 4, 3.0, 2.75, 24, 1536, 512),
    "halonet_h7": (10, 3, 4.0, 3.5, 26, 2048, 600),
}


@pytest.mark.parametrize("name", sorted(PAPER_TABLE))
def test_paper_variant_layout(name: str) -> None:
    b, h, r_v, r_b, depth3, d_f, res = PAPER_TABLE[name]
    model = zoo.create_model(name, device="meta")
    assert [len(s) for s in model.stages] == [3, 3, depth3, 3]
    for stage, width, heads in zip(model.stages, (64, 128, 256, 512), (4, 8, 8, 8)):
        for block in stage:
            attn = block.self_attn
            assert isinstance(attn, ZooHaloAttn)
            assert (attn.block_size, attn.halo_size, attn.num_heads) == (b, h, heads)
            assert (attn.dim_out_qk, attn.dim_out_v) == (width, int(round(r_v * width)))
            assert block.conv3_1x1.conv.out_channels == int(round(r_b * width))
    assert model.num_features == (d_f or int(round(r_b * 512)))
    cfg = zoo.get_pretrained_cfg(name)
    assert cfg.input_size == (3, res, res) and cfg.pool_size == (math.ceil(res / 32),) * 2


def test_halonet_h1_is_timm_layout() -> None:
    reference = timm.create_model("halonet_h1", device="meta").state_dict()
    model = zoo.create_model("halonet_h1", device="meta").state_dict()
    assert {k: v.shape for k, v in model.items()} == {k: v.shape for k, v in reference.items()}
    assert halonet.model_cfgs["halonet_h1"] is timm.models.byoanet.model_cfgs["halonet_h1"]
