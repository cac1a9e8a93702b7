"""BiFormer: parity with the original architecture, official checkpoint loading, bad input, timm contract.

The parity reference is a minimal re-implementation, in this file, of the official classification modules
(``models/biformer.py``, ``models/_common.py::AttentionLePE``, ``ops/bra_legacy.py``) with the official key
names and the legacy *gather* formulation of bi-level routing attention, written from the project's spec
(``biformer.md``). An official-format checkpoint (``{'model': state_dict}``, official keys) is generated from
it, loaded through ``zoo.create_model(..., pretrained=True, pretrained_cfg_overlay=dict(file=...))`` and the
outputs compared in fp32: max |diff| <= 1e-5 * max(1, max |output|) (observed <= 7e-7 relative).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import zoo
import zoo.models.biformer as bf  # until the lead adds it to zoo/models/__init__.py

RTOL = 1e-5  # parity tolerance, relative to the output's largest magnitude (fp32, CPU)

# --------------------------------------------------------------------------------------------------------
# The original architecture (official key names, legacy gather BRA), re-implemented from the spec
# --------------------------------------------------------------------------------------------------------


class _LegacyQKVLinear(nn.Module):
    def __init__(self, dim: int, qk_dim: int):
        super().__init__()
        self.dim, self.qk_dim = dim, qk_dim
        self.qkv = nn.Linear(dim, 2 * qk_dim + dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.qkv(x).split([self.qk_dim, self.qk_dim + self.dim], dim=-1)  # q, kv


class _LegacyBRA(nn.Module):
    """ops/bra_legacy.py::BiLevelRoutingAttention with the released settings (identity kv_down, hard routing)."""

    def __init__(self, dim: int, num_heads: int, n_win: int, topk: int, side_dwconv: int = 5, auto_pad: bool = False):
        super().__init__()
        self.dim, self.num_heads, self.n_win, self.topk, self.auto_pad = dim, num_heads, n_win, topk, auto_pad
        self.scale = dim**-0.5  # qk_dim ** -0.5 (the whole width)
        self.lepe = nn.Conv2d(dim, dim, side_dwconv, padding=side_dwconv // 2, groups=dim)
        self.qkv = _LegacyQKVLinear(dim, dim)
        self.wo = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, H_in, W_in, C = x.shape
        S = self.n_win
        if self.auto_pad:
            pad_b, pad_r = (S - H_in % S) % S, (S - W_in % S) % S
            x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))
        else:
            assert H_in % S == 0 and W_in % S == 0
        _, H, W, _ = x.shape
        h, w = H // S, W // S
        x = x.reshape(n, S, h, S, w, C).permute(0, 1, 3, 2, 4, 5).reshape(n, S * S, h, w, C)  # regions
        q, kv = self.qkv(x)
        q_pix = q.reshape(n, S * S, h * w, C)
        kv_pix = kv.reshape(n, S * S, h * w, 2 * C)
        q_win, k_win = q.mean([2, 3]), kv[..., :C].mean([2, 3])
        v_map = kv[..., C:].reshape(n, S, S, h, w, C).permute(0, 5, 1, 3, 2, 4).reshape(n, C, H, W)
        lepe = self.lepe(v_map.contiguous()).permute(0, 2, 3, 1)

        logits = (q_win.detach() * self.scale) @ k_win.detach().transpose(-2, -1)  # TopkRouting
        r_idx = torch.topk(logits, k=self.topk, dim=-1).indices  # (n, S^2, topk)
        kv_sel = torch.gather(  # KVGather: materialises topk copies
            kv_pix.view(n, 1, S * S, h * w, 2 * C).expand(-1, S * S, -1, -1, -1),
            dim=2,
            index=r_idx.view(n, S * S, self.topk, 1, 1).expand(-1, -1, -1, h * w, 2 * C),
        )
        k_sel, v_sel = kv_sel.split([C, C], dim=-1)
        m, d = self.num_heads, C // self.num_heads
        k_sel = k_sel.reshape(n * S * S, self.topk, h * w, m, d).permute(0, 3, 4, 1, 2).reshape(n * S * S, m, d, -1)
        v_sel = v_sel.reshape(n * S * S, self.topk, h * w, m, d).permute(0, 3, 1, 2, 4).reshape(n * S * S, m, -1, d)
        q_pix = q_pix.reshape(n * S * S, h * w, m, d).permute(0, 2, 1, 3)
        attn = ((q_pix * self.scale) @ k_sel).softmax(dim=-1)
        out = attn @ v_sel  # (n S^2, m, h w, d)
        out = out.reshape(n, S, S, m, h, w, d).permute(0, 1, 4, 2, 5, 3, 6).reshape(n, H, W, C)
        out = self.wo(out + lepe)
        return out[:, :H_in, :W_in].contiguous() if (H, W) != (H_in, W_in) else out


class _LegacyAttentionLePE(nn.Module):
    """models/_common.py::AttentionLePE: 8 heads, no qkv bias, LCE on the attention input."""

    def __init__(self, dim: int, num_heads: int = 8, side_dwconv: int = 5):
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=False)
        self.proj = nn.Linear(dim, dim)
        self.lepe = nn.Conv2d(dim, dim, side_dwconv, padding=side_dwconv // 2, groups=dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, H, W, C = x.shape
        x = x.reshape(n, H * W, C)
        qkv = self.qkv(x).reshape(n, H * W, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        lepe = self.lepe(x.transpose(1, 2).reshape(n, C, H, W)).flatten(2).transpose(1, 2)
        attn = ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)
        out = (attn @ v).transpose(1, 2).reshape(n, H * W, C) + lepe
        return self.proj(out).reshape(n, H, W, C)


class _LegacyBlock(nn.Module):
    def __init__(self, dim, num_heads, n_win, topk, mlp_ratio, stl=False, auto_pad=False):
        super().__init__()
        if not stl:
            self.pos_embed = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        if topk > 0:
            self.attn = _LegacyBRA(dim, num_heads, n_win, topk, auto_pad=auto_pad)
        else:
            self.attn = _LegacyAttentionLePE(dim)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        hidden = int(mlp_ratio * dim)
        if stl:
            self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
        else:  # slot 1 is the disabled MLP dwconv
            self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.Identity(), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if hasattr(self, "pos_embed"):
            x = x + self.pos_embed(x)
        x = x.permute(0, 2, 3, 1)
        x = x + self.attn(self.norm1(x))
        x = x + self.mlp(self.norm2(x))
        return x.permute(0, 3, 1, 2)


class _LegacySTLStage(nn.Module):
    def __init__(self, blocks):
        super().__init__()
        self.blocks = nn.Sequential(*blocks)

    def forward(self, x):
        return self.blocks(x)


class _LegacyBiFormer(nn.Module):
    """models/biformer.py::BiFormer (T/S/B) and the STL layout, official state-dict keys and order."""

    def __init__(self, depth, embed_dim, mlp_ratio, n_win=7, topks=(1, 4, 16, -2), stl=False, auto_pad=False):
        super().__init__()
        e = embed_dim
        self.downsample_layers = nn.ModuleList()
        if stl:
            self.downsample_layers.append(nn.Sequential(nn.Conv2d(3, e[0], 4, stride=4), nn.BatchNorm2d(e[0])))
        else:
            self.downsample_layers.append(
                nn.Sequential(
                    nn.Conv2d(3, e[0] // 2, 3, 2, 1),
                    nn.BatchNorm2d(e[0] // 2),
                    nn.GELU(),
                    nn.Conv2d(e[0] // 2, e[0], 3, 2, 1),
                    nn.BatchNorm2d(e[0]),
                )  # fmt: skip
            )
        for i in range(3):
            if stl:
                layer = nn.Sequential(nn.BatchNorm2d(e[i]), nn.Conv2d(e[i], e[i + 1], 2, stride=2))
            else:
                layer = nn.Sequential(nn.Conv2d(e[i], e[i + 1], 3, 2, 1), nn.BatchNorm2d(e[i + 1]))
            self.downsample_layers.append(layer)
        self.stages = nn.ModuleList()
        for i in range(4):
            blocks = [
                _LegacyBlock(e[i], e[i] // 32, n_win, topks[i], mlp_ratio, stl=stl, auto_pad=auto_pad)
                for _ in range(depth[i])
            ]
            self.stages.append(_LegacySTLStage(blocks) if stl else nn.Sequential(*blocks))
        self.norm = nn.BatchNorm2d(e[-1])
        self.head = nn.Linear(e[-1], 1000)

    def stage_outputs(self, x: torch.Tensor) -> list[torch.Tensor]:
        outs = []
        for i in range(4):
            x = self.stages[i](self.downsample_layers[i](x))
            outs.append(x)
        return outs

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.stage_outputs(x)[-1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x).flatten(2).mean(-1))


_LEGACY_ARGS = {
    "biformer_tiny": dict(depth=(2, 2, 8, 2), embed_dim=(64, 128, 256, 512), mlp_ratio=3),
    "biformer_small": dict(depth=(4, 4, 18, 4), embed_dim=(64, 128, 256, 512), mlp_ratio=3),
    "biformer_stl": dict(depth=(2, 2, 6, 2), embed_dim=(96, 192, 384, 768), mlp_ratio=4, stl=True),
}


def _randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random weights everywhere (biases too, so padded tokens carry a non-zero bias) and random BN stats."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1 + (1.0 if name.endswith("weight") else 0.0))
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5 * p[0].numel() ** -0.5)
        for name, b in model.named_buffers():
            if name.endswith("running_mean"):
                b.copy_(torch.randn(b.shape, generator=g) * 0.1)
            elif name.endswith("running_var"):
                b.copy_(torch.rand(b.shape, generator=g) + 0.5)
    return model.eval()


def _assert_parity(ours: torch.Tensor, ref: torch.Tensor, what: str) -> None:
    assert ours.shape == ref.shape, f"{what}: shape {tuple(ours.shape)} vs {tuple(ref.shape)}"
    diff = (ours - ref).abs().max().item()
    bound = RTOL * max(1.0, ref.abs().max().item())
    assert diff <= bound, f"{what}: max |diff| {diff:.3g} > {bound:.3g}"


@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory):
    """(legacy BiFormer-T with auto_pad, zoo model loaded from its official-format .pth, checkpoint path)."""
    legacy = _randomize(_LegacyBiFormer(**_LEGACY_ARGS["biformer_tiny"], auto_pad=True))
    path = tmp_path_factory.mktemp("biformer") / "biformer_tiny_in1k.pth"
    torch.save({"model": legacy.state_dict()}, path)
    model = zoo.create_model("biformer_tiny", pretrained=True, pretrained_cfg_overlay=dict(file=str(path))).eval()
    return legacy, model, path


# --------------------------------------------------------------------------------------------------------
# Architecture numbers
# --------------------------------------------------------------------------------------------------------


def test_legacy_reference_has_the_official_keys():
    sd = _LegacyBiFormer(**_LEGACY_ARGS["biformer_tiny"]).state_dict()
    keys = list(sd)
    assert len(keys) == 264
    assert keys[:3] == ["downsample_layers.0.0.weight", "downsample_layers.0.0.bias", "downsample_layers.0.1.weight"]
    block = [k.removeprefix("stages.0.0.") for k in keys if k.startswith("stages.0.0.")]
    assert block == [
        "pos_embed.weight", "pos_embed.bias", "norm1.weight", "norm1.bias", "attn.lepe.weight", "attn.lepe.bias",
        "attn.qkv.qkv.weight", "attn.qkv.qkv.bias", "attn.wo.weight", "attn.wo.bias", "norm2.weight",
        "norm2.bias", "mlp.0.weight", "mlp.0.bias", "mlp.3.weight", "mlp.3.bias",
    ]  # fmt: skip
    assert sd["stages.3.1.attn.qkv.weight"].shape == (1536, 512) and "stages.3.1.attn.qkv.bias" not in sd
    assert keys[-2:] == ["head.weight", "head.bias"]
    assert len(_LegacyBiFormer(**_LEGACY_ARGS["biformer_stl"]).state_dict()) == 201


@pytest.mark.parametrize(
    "name,params,n_keys",
    [
        ("biformer_tiny", 13_142_760, 264),
        ("biformer_small", 25_536_232, 518),
        ("biformer_base", 56_804_968, 518),
        ("biformer_stl", 28_372_552, 201),
    ],
)
def test_params(name, params, n_keys):
    model = zoo.create_model(name, device="meta")  # shapes only: no init cost
    assert sum(p.numel() for p in model.parameters()) == params
    assert len(model.state_dict()) == n_keys


def _gmacs(name: str) -> float:
    # MACs = FlopCounterMode total / 2 at 224, on the gather reference backend (real tensors: the op
    # validates routing indices by value, which meta tensors cannot do)
    model = zoo.create_model(name, attn_backend="torch").eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.zeros(1, 3, 224, 224))
    return round(counter.get_total_flops() / 2e9, 2)


def test_gmacs_tiny():
    assert _gmacs("biformer_tiny") == 2.22


@pytest.mark.slow  # a forward of each larger variant at 224: ~30 s on 2 CPU cores
@pytest.mark.parametrize("name,gmacs", [("biformer_small", 4.46), ("biformer_base", 9.76), ("biformer_stl", 4.57)])
def test_gmacs_larger(name, gmacs):
    assert _gmacs(name) == gmacs


# --------------------------------------------------------------------------------------------------------
# Parity with the original model through an official-format checkpoint
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [(224, 224), (250, 200)], ids=["224", "250x200"])
def test_official_checkpoint_parity(tiny_pair, size):
    legacy, model, _ = tiny_pair
    x = torch.randn(1, 3, *size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref_stages = legacy.stage_outputs(x)
        ref_logits = legacy.head(legacy.norm(ref_stages[-1]).flatten(2).mean(-1))
        final, stages = model.forward_intermediates(x)
        logits = model.forward_head(final)
    for i, (ours, ref) in enumerate(zip(stages, ref_stages)):
        _assert_parity(ours, ref, f"stage {i} at {size}")  # stage by stage: a routing flip shows where
    _assert_parity(logits, ref_logits, f"logits at {size}")


def test_parity_other_backends(tiny_pair):
    """The gather reference backend and the dispatch's default give the same model output."""
    legacy, model, _ = tiny_pair
    x = torch.randn(1, 3, 112, 112, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = legacy(x)
        outs = {}
        for backend in ("torch", None):
            model.set_attn_backend(backend)
            outs[backend] = model(x)
    model.set_attn_backend(None)
    for backend, out in outs.items():
        _assert_parity(out, ref, f"backend {backend}")


def test_stl_parity(tmp_path):
    legacy = _randomize(_LegacyBiFormer(**_LEGACY_ARGS["biformer_stl"]), seed=3)
    path = tmp_path / "biformer_stl_in1k.pth"
    torch.save({"model": legacy.state_dict()}, path)
    model = zoo.create_model("biformer_stl", pretrained=True, pretrained_cfg_overlay=dict(file=str(path))).eval()
    x = torch.randn(1, 3, 112, 112, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        _assert_parity(model(x), legacy(x), "STL logits")


@pytest.mark.parametrize("hw", [(14, 14), (10, 13), (4, 5), (1, 9)])
def test_bra_original_padding_matches_legacy(hw):
    """BRA alone at maps that need padding, including maps smaller than the n_win x n_win grid."""
    torch.manual_seed(5)
    legacy = _randomize(_LegacyBRA(32, 2, n_win=7, topk=4, auto_pad=True), seed=5)
    ours = bf.BiLevelRoutingAttention(32, 2, n_win=7, topk=4, pad_mode="original").eval()
    ours.qkv.load_state_dict(legacy.qkv.qkv.state_dict())
    ours.proj.load_state_dict(legacy.wo.state_dict())
    ours.lepe.load_state_dict(legacy.lepe.state_dict())
    x = torch.randn(2, *hw, 32)
    with torch.no_grad():
        _assert_parity(ours(x), legacy(x), f"BRA {hw}")


# --------------------------------------------------------------------------------------------------------
# Padding modes
# --------------------------------------------------------------------------------------------------------


def _bra_pair(pad_modes=("original", "masked"), **kwargs):
    torch.manual_seed(6)
    first = _randomize(bf.BiLevelRoutingAttention(32, 2, pad_mode=pad_modes[0], **kwargs), seed=6)
    others = []
    for mode in pad_modes[1:]:
        m = bf.BiLevelRoutingAttention(32, 2, pad_mode=mode, **kwargs).eval()
        m.load_state_dict(first.state_dict())
        others.append(m)
    return first, *others


def test_pad_modes_agree_without_padding():
    original, masked, none = _bra_pair(("original", "masked", "none"), n_win=7, topk=4)
    x = torch.randn(1, 14, 21, 32)
    with torch.no_grad():
        ref = original(x)
        assert torch.equal(masked(x), ref) and torch.equal(none(x), ref)


def _split_qkv(bra: bf.BiLevelRoutingAttention, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Dense per-head q, k, v ``(B, nh, H*W, d)`` and the V map ``(B, C, H, W)`` of an unpadded input."""
    B, H, W, C = x.shape
    qkv = bra.qkv(x)
    q, k, v = qkv.reshape(B, H * W, 3, bra.num_heads, C // bra.num_heads).permute(2, 0, 3, 1, 4)
    return q, k, v, qkv[..., 2 * bra.qk_dim :].permute(0, 3, 1, 2)


def test_masked_mode_routes_everything_like_dense_attention():
    """With topk = n_win**2 every region is routed: masked BRA == dense attention over the real tokens only."""
    original, masked = _bra_pair(n_win=3, topk=9)
    x = torch.randn(2, 5, 7, 32)  # padded to 6 x 9
    with torch.no_grad():
        q, k, v, v_map = _split_qkv(masked, x)
        dense = F.scaled_dot_product_attention(q, k, v, scale=masked.scale).transpose(1, 2).reshape(2, 5, 7, 32)
        dense = masked.proj(dense + masked.lepe(v_map).permute(0, 2, 3, 1))
        _assert_parity(masked(x), dense, "masked BRA vs dense")
        assert (original(x) - dense).abs().max() > 1e-3  # the original attends to the padded tokens


def test_masked_mode_never_routes_to_empty_regions():
    """A 2x2 map in a 7x7 grid: region size 1, 45 of 49 regions hold no real token; top-1 routing must pick,
    for every query, the real token with the best affinity, never an empty region."""
    (masked,) = _bra_pair(("masked",), n_win=7, topk=1)
    x = torch.randn(1, 2, 2, 32)
    with torch.no_grad():
        q, k, v, v_map = _split_qkv(masked, x)
        q_all, k_all = masked.qkv(x)[..., :32].reshape(1, 4, 32), masked.qkv(x)[..., 32:64].reshape(1, 4, 32)
        best = (q_all @ k_all.transpose(-1, -2)).argmax(-1)[0]  # (4,)
        expected = v.transpose(1, 2).reshape(1, 4, 32)[:, best].reshape(1, 2, 2, 32)
        expected = masked.proj(expected + masked.lepe(v_map).permute(0, 2, 3, 1))
        _assert_parity(masked(x), expected, "masked top-1 on a 2x2 map")


def test_pad_mode_none_rejects_non_multiples():
    model = bf.BiFormer(depths=(1, 1, 1, 1), embed_dims=(32, 64, 96, 128), pad_mode="none").eval()
    with pytest.raises(AssertionError, match=r"not a multiple of n_win=7.*pad_mode='original'"):
        model(torch.randn(1, 3, 100, 100))


# --------------------------------------------------------------------------------------------------------
# Checkpoint mapping and bad input
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["biformer_tiny", "biformer_stl"])
def test_mapping_round_trip_and_idempotence(name):
    official = _LegacyBiFormer(**_LEGACY_ARGS[name]).state_dict()
    model = zoo.create_model(name, device="meta")
    converted = bf.checkpoint_filter_fn({"model": official}, model)
    assert sorted(converted) == sorted(model.state_dict())  # every key, none left over
    assert all(converted[k].shape == v.shape for k, v in model.state_dict().items())
    again = bf.checkpoint_filter_fn(converted, model)  # idempotent on zoo dicts
    assert list(again) == list(converted) and all(again[k] is converted[k] for k in converted)
    back = bf.checkpoint_to_official(converted, stl=name == "biformer_stl")
    assert list(back) == list(official) and all(back[k] is official[k] for k in official)


def test_ddp_prefix_is_stripped(tiny_pair):
    legacy, model, _ = tiny_pair
    wrapped = {"model": {f"module.{k}": v for k, v in legacy.state_dict().items()}}
    assert "stem.conv1.weight" in bf.checkpoint_filter_fn(wrapped, model)


def test_official_checkpoint_adapts_in_chans_and_classes(tiny_pair):
    _, _, path = tiny_pair
    model = zoo.create_model(
        "biformer_tiny", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), in_chans=1, num_classes=5
    ).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 1, 64, 64)).shape == (1, 5)


def test_wrong_variant_is_a_clear_error(tiny_pair):
    _, _, path = tiny_pair
    with pytest.raises(bf.BiFormerCheckpointError, match=r"checkpoint is biformer_tiny .* model is biformer_stl"):
        zoo.create_model("biformer_stl", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))


def test_foreign_checkpoint_is_a_clear_error():
    with pytest.raises(bf.BiFormerCheckpointError, match="not a BiFormer checkpoint"):
        bf.checkpoint_filter_fn({"model": {"conv1.weight": torch.zeros(1)}}, None)


def test_truncated_file_is_a_clear_error(tiny_pair, tmp_path):
    _, _, path = tiny_pair
    data = path.read_bytes()
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(bf.BiFormerCheckpointError, match=r"truncated\.pth .* truncated or corrupted"):
        zoo.create_model("biformer_tiny", pretrained=True, pretrained_cfg_overlay=dict(file=str(truncated)))
    garbage = tmp_path / "page.pth"
    garbage.write_bytes(b"<html>not found</html>")
    with pytest.raises(bf.BiFormerCheckpointError, match="not a PyTorch checkpoint"):
        zoo.create_model("biformer_tiny", pretrained=True, pretrained_cfg_overlay=dict(file=str(garbage)))


def test_n_win_too_large_for_topk_is_a_clear_error():
    with pytest.raises(ValueError, match=r"topk=16 must be in \[1, n_win\*\*2=9\]"):
        zoo.create_model("biformer_tiny", n_win=3, device="meta")


def test_input_smaller_than_region_grid_is_padded():
    """32x32: the stage maps (8, 4, 2) are smaller than / not multiples of n_win=7; padding documents it."""
    model = zoo.create_model("biformer_tiny", num_classes=5).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 32, 32))
    assert out.shape == (1, 5) and torch.isfinite(out).all()


# --------------------------------------------------------------------------------------------------------
# timm contract (the generic conformance suite covers the rest)
# --------------------------------------------------------------------------------------------------------


def _small(**kwargs) -> bf.BiFormer:
    torch.manual_seed(0)
    args = dict(depths=(1, 1, 2, 1), embed_dims=(32, 64, 96, 128), n_win=4, topks=(1, 2, 4, -2))
    return bf.BiFormer(**{**args, **kwargs}).eval()


def test_features_and_intermediates():
    model = zoo.create_model("biformer_tiny", features_only=True, in_chans=1).eval()
    assert model.feature_info.reduction() == [4, 8, 16, 32]
    assert model.feature_info.module_name() == [f"stages.{i}" for i in range(4)]
    with torch.no_grad():
        feats = model(torch.randn(1, 1, 72, 88))
    assert [tuple(f.shape) for f in feats] == [(1, 64, 18, 22), (1, 128, 9, 11), (1, 256, 5, 6), (1, 512, 3, 3)]


def test_timm_contract():
    model = _small(num_classes=7)
    x = torch.randn(2, 3, 72, 88)  # non-square, not a multiple of 32
    with torch.no_grad():
        feats = model.forward_features(x)
        final, inter = model.forward_intermediates(x)
        assert torch.equal(final, feats) and feats.shape == (2, 128, 3, 3)
        assert [t.shape[1] for t in inter] == [32, 64, 96, 128]
        assert model.forward_head(feats, pre_logits=True).shape == (2, model.head_hidden_size)
        model.set_grad_checkpointing(True)
        assert torch.equal(model.forward_features(x), feats)
        model.set_grad_checkpointing(False)
        assert len(model.forward_intermediates(x, indices=2, intermediates_only=True)) == 2
    assert model.get_classifier() is model.head.fc
    model.reset_classifier(0, "")
    with torch.no_grad():
        assert model(x).shape == (2, 128, 3, 3)
    assert model.prune_intermediate_layers(indices=[1]) == [1] and len(model.stages) == 2


def test_cfgs():
    cfg = zoo.get_pretrained_cfg("biformer_tiny.in1k")
    sd = zoo.create_model("biformer_tiny", device="meta").state_dict()
    assert f"{cfg.first_conv}.weight" in sd and f"{cfg.classifier}.weight" in sd
    assert cfg.first_conv == "stem.conv1" and cfg.classifier == "head.fc" and cfg.pool_size == (7, 7)
    assert cfg.crop_pct == 0.875 and cfg.interpolation == "bicubic" and cfg.paper_ids == "arXiv:2303.08810"
    assert cfg.url.startswith("https://api.onedrive.com/") and cfg.license
    assert set(zoo.list_pretrained("biformer*")) >= {f"biformer_{v}.in1k" for v in ("tiny", "small", "base")}


def test_deterministic_backward():
    model = _small().train()
    x = torch.randn(2, 3, 64, 80)
    grads = []
    torch.use_deterministic_algorithms(True)
    try:
        for _ in range(2):
            model.zero_grad()
            model(x).sum().backward()
            grads.append([p.grad.clone() for p in model.parameters()])
    finally:
        torch.use_deterministic_algorithms(False)
    assert all(g is not None for g in grads[0])
    assert all(torch.equal(a, b) for a, b in zip(*grads))


def test_compile_fullgraph_and_export():
    model = _small(attn_backend="torch")
    x = torch.randn(1, 3, 64, 80)  # stage maps 16x20, 8x10, 4x5: padded in every BRA stage
    with torch.no_grad():
        ref = model(x)
        torch._dynamo.reset()
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")  # dynamo capture, no codegen
        _assert_parity(compiled(x), ref, "torch.compile")
        exported = torch.export.export(model, (x,))
        _assert_parity(exported.module()(x), ref, "torch.export")


@pytest.mark.parametrize("backend", ["torch", None])
def test_compile_fullgraph_training(backend):
    model = _small(attn_backend=backend).train()
    x = torch.randn(1, 3, 64, 64)
    torch._dynamo.reset()
    torch.compile(model, fullgraph=True, backend="aot_eager")(x).sum().backward()
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.slow  # inductor code generation for a whole model: minutes on 2 CPU cores
def test_compile_inductor():
    model = _small(attn_backend="torch")
    x = torch.randn(1, 3, 64, 80)
    with torch.no_grad():
        ref = model(x)
        torch._dynamo.reset()
        _assert_parity(torch.compile(model, fullgraph=True)(x), ref, "inductor")
