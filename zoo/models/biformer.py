"""BiFormer (Zhu et al., CVPR 2023, arXiv:2303.08810) on zoo's routed-attention op.

Weight-compatible with the official checkpoints of ``rayleizhu/BiFormer`` (T/S/B and the STL ablation):
``checkpoint_filter_fn`` maps the official keys to the timm-style layout below, and
``checkpoint_to_official`` maps them back.

Layout (zoo name <- official name)::

    stem.{conv1,norm1,act,conv2,norm2}   <- downsample_layers.0.{0,1,2,3,4}   (STL: conv1/norm1 <- 0.{0,1})
    stages.{i}.downsample.{conv,norm}    <- downsample_layers.{i}.{0,1}        (STL: norm first, .{0,1} swapped)
    stages.{i}.blocks.{j}.pos_conv       <- stages.{i}.{j}.pos_embed           (STL: stages.{i}.blocks.{j}, none)
    ...attn.qkv / attn.proj / attn.lepe  <- attn.qkv.qkv / attn.wo / attn.lepe  (stage 4: qkv / proj / lepe)
    ...mlp.fc1 / mlp.fc2                 <- mlp.0 / mlp.3                       (STL: mlp.0 / mlp.2)
    norm (BatchNorm2d), head.fc          <- norm, head

Architecture (spec ``biformer.md``): stages 1-3 use bi-level routing attention (BRA): the map is cut into
``n_win x n_win`` regions, every query region is routed to the ``topk`` regions whose mean key best matches
its mean query (one routing for all heads, on detached means), and its queries attend jointly to the tokens
of those regions; a 5x5 depthwise conv on V (LCE) is added. Stage 4 is global attention with 8 heads, no qkv
bias and the LCE applied to the attention input. Quirk kept for the weights: the BRA temperature is
``qk_dim ** -0.5`` (whole width), not ``head_dim ** -0.5``, also in the routing logits.

Inputs of any size: BRA pads the map bottom/right to a multiple of ``n_win`` (``pad_mode``):

* ``'original'`` (default): the official ``auto_pad``: zero-pad the normed input *before* the qkv projection
  (padded tokens carry the projection bias), region means include the padded tokens, padded keys are
  routed to and attended like real ones, the LCE runs over the padded V map. Bitwise the unpadded model
  at sizes whose stage maps are multiples of ``n_win`` (224, 448, ...); what the det/seg weights assume.
* ``'masked'``: padded keys get no attention (``key_padding``), region means count real tokens only,
  regions holding no real token are never routed to, the LCE sees the unpadded V. Outputs at real tokens
  do not depend on the padding.
* ``'none'``: no padding; a map that is not a multiple of ``n_win`` is an error (the official default for
  classification, where only sides in [112k-3, 112k] work).

Maps smaller than the region grid (``n_win`` larger than the map) are padded in the same way; ``topk``
larger than the number of regions ``n_win**2`` is an error at construction.

The attention itself is ``zoo.ops.region_routing`` + ``zoo.ops.routed_attention`` (backend by the ops
dispatch, or ``attn_backend=`` / ``set_attn_backend``); the model never gathers keys/values itself.
"""

from __future__ import annotations

import re
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import ClassifierHead, DropPath, Mlp, _assert, trunc_normal_
from timm.layers._fx import register_notrace_module
from timm.models import build_model_with_cfg, checkpoint_seq, generate_default_cfgs
from timm.models._builder import resolve_pretrained_cfg
from timm.models._features import feature_take_indices

from .. import ops
from .._registry import register_model

__all__ = [
    "BiFormer",
    "BiLevelRoutingAttention",
    "AttentionLePE",
    "BiFormerCheckpointError",
    "checkpoint_filter_fn",
    "checkpoint_to_official",
    "FAMILY",
]

PAD_MODES = ("original", "masked", "none")


class BiFormerCheckpointError(ValueError):
    """A checkpoint that cannot be loaded into the requested BiFormer (wrong variant, unreadable file)."""


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _lce_conv(dim: int, kernel: int, **dd) -> nn.Conv2d:
    """The depthwise local-context conv (LCE / LePE), its weight strided channels-last.

    It always sees channels-last activations (a permuted ``(B, H, W, C)`` map), so its weight gradient comes out
    channels-last. A ``(C, 1, k, k)`` weight holds the same bytes in either layout; with matching strides DDP
    uses the gradient as its bucket view (no copy, no "grad strides do not match" warning on every rank).
    """
    conv = nn.Conv2d(dim, dim, kernel, padding=kernel // 2, groups=dim, **dd)
    # .contiguous(channels_last) would keep the strides: with C_in / groups = 1 both layouts count as contiguous
    weight = torch.empty_like(conv.weight, memory_format=torch.channels_last, requires_grad=False)
    conv.weight = nn.Parameter(weight.copy_(conv.weight.detach()))
    return conv


@register_notrace_module  # shape-dependent padding: a leaf for FX feature extraction
class BiLevelRoutingAttention(nn.Module):
    """Bi-level routing attention (legacy official semantics) on ``zoo.ops``.

    Input and output ``(B, H, W, C)`` (channels last, already layer-normed).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        n_win: int = 7,
        topk: int = 4,
        qk_dim: int | None = None,
        qk_scale: float | None = None,
        lce_kernel: int = 5,
        pad_mode: str = "original",
        attn_backend: str | None = None,
        device=None,
        dtype=None,
    ):
        """
        Args:
            dim: channels C (and V width).
            num_heads: heads; ``qk_dim`` and ``dim`` must both divide by it.
            n_win: regions per side; the map is cut into ``n_win**2`` regions.
            topk: routed regions per query region (<= ``n_win**2``).
            qk_dim: Q/K width, ``dim`` by default (all released models).
            qk_scale: attention and routing temperature; ``qk_dim ** -0.5`` by default (official quirk).
            lce_kernel: kernel of the depthwise conv on V (local context enhancement).
            pad_mode: ``'original'``, ``'masked'`` or ``'none'`` (see the module docstring).
            attn_backend: ``zoo.ops.routed_attention`` backend, None for the dispatch's choice.
        """
        dd = dict(device=device, dtype=dtype)
        super().__init__()
        qk_dim = qk_dim or dim
        if num_heads < 1 or n_win < 1:
            raise ValueError(f"num_heads={num_heads} and n_win={n_win} must both be >= 1")
        if qk_dim % num_heads or dim % num_heads:
            raise ValueError(f"qk_dim={qk_dim} and dim={dim} must both be divisible by num_heads={num_heads}")
        if not 0 < topk <= n_win * n_win:
            raise ValueError(
                f"topk={topk} must be in [1, n_win**2={n_win * n_win}]: with n_win={n_win} there are only "
                f"{n_win * n_win} regions to route to; use a larger n_win or a smaller topk"
            )
        if pad_mode not in PAD_MODES:
            raise ValueError(f"pad_mode={pad_mode!r}; expected one of {PAD_MODES}")
        self.dim = dim
        self.qk_dim = qk_dim
        self.num_heads = num_heads
        self.n_win = n_win
        self.topk = topk
        self.scale = qk_scale or qk_dim**-0.5
        self.pad_mode = pad_mode
        self.attn_backend = attn_backend
        self.qkv = nn.Linear(dim, 2 * qk_dim + dim, **dd)  # output rows [q | k | v], as the official QKVLinear
        self.lepe = _lce_conv(dim, lce_kernel, **dd)
        self.proj = nn.Linear(dim, dim, **dd)

    def _region_mean(self, t: torch.Tensor, rh: int, rw: int, valid_hw: tuple[int, int] | None) -> torch.Tensor:
        """Per-region mean ``(B, S*S, c)`` of a padded map ``(B, S*rh, S*rw, c)``, regions row-major.

        ``valid_hw=None`` averages every token (padding included, as the original); otherwise only the
        tokens above row ``valid_hw[0]`` and left of column ``valid_hw[1]`` count (a padded map is zero there).
        """
        B, _, _, c = t.shape
        S = self.n_win
        # (B, S, S, rh, rw, c) contiguous, reduced over (rh, rw): the original's layout and summation order
        regions = t.reshape(B, S, rh, S, rw, c).permute(0, 1, 3, 2, 4, 5).reshape(B, S * S, rh, rw, c)
        if valid_hw is None:
            return regions.mean([2, 3])
        rows = (valid_hw[0] - torch.arange(S, device=t.device) * rh).clamp(0, rh)
        cols = (valid_hw[1] - torch.arange(S, device=t.device) * rw).clamp(0, rw)
        counts = (rows[:, None] * cols[None, :]).reshape(1, S * S, 1).clamp(min=1).to(t.dtype)
        return regions.sum([2, 3]) / counts

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, H, W, C) -> (B, H, W, C)``."""
        B, H, W, C = x.shape
        S = self.n_win
        rh, rw = _ceil_div(H, S), _ceil_div(W, S)  # region size after padding to a multiple of n_win
        pad_b, pad_r = rh * S - H, rw * S - W
        padded = pad_b > 0 or pad_r > 0
        masked = self.pad_mode == "masked"
        if self.pad_mode == "none":
            _assert(
                not padded,
                f"BiFormer BRA: feature map {H}x{W} is not a multiple of n_win={S}; pass pad_mode='original' "
                f"or 'masked', or use an input whose sides give stage maps divisible by n_win (224 for n_win=7)",
            )
        if padded and not masked:
            x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))  # before the projection: padded tokens carry the bias
        qkv = self.qkv(x)
        if padded and masked:
            qkv = F.pad(qkv, (0, 0, 0, pad_r, 0, pad_b))  # after it: zeros, masked out below
        Hp, Wp = rh * S, rw * S
        q, k, v = qkv.split([self.qk_dim, self.qk_dim, self.dim], dim=-1)

        # routing on detached region means, shared by all heads; logits (q_r * scale) @ k_r^T as the original
        valid_hw = (H, W) if padded and masked else None
        q_region = self._region_mean(q.detach(), rh, rw, valid_hw) * self.scale
        k_region = self._region_mean(k.detach(), rh, rw, valid_hw)
        if valid_hw is not None and (_ceil_div(H, rh) < S or _ceil_div(W, rw) < S):
            # some regions hold no real token: an extra channel gives their logits a huge negative offset,
            # so a query region is never routed to keys that are all masked (no all-masked softmax row)
            q_region, k_region = self._exclude_empty_regions(q_region, k_region, rh, rw, H, W)
        routing_idx = ops.region_routing(q_region, k_region, self.topk)  # (B, S*S, topk)

        nh = self.num_heads
        q = q.reshape(B, Hp, Wp, nh, self.qk_dim // nh).permute(0, 3, 1, 2, 4)
        k = k.reshape(B, Hp, Wp, nh, self.qk_dim // nh).permute(0, 3, 1, 2, 4)
        v_heads = v.reshape(B, Hp, Wp, nh, C // nh).permute(0, 3, 1, 2, 4)
        out = ops.routed_attention(
            q, k, v_heads, routing_idx, (rh, rw), self.scale,
            key_padding=valid_hw, backend=self.attn_backend or "auto",
        )  # fmt: skip
        out = out.permute(0, 2, 3, 1, 4).reshape(B, Hp, Wp, C)

        if masked:
            out = out[:, :H, :W]
            lepe = self.lepe(v[:, :H, :W].permute(0, 3, 1, 2))  # LCE over the real map only
        else:
            lepe = self.lepe(v.permute(0, 3, 1, 2))  # LCE over the padded V map, as the original
        out = out + lepe.permute(0, 2, 3, 1)
        if padded and not masked:
            out = out[:, :H, :W]
        return self.proj(out)

    def _exclude_empty_regions(
        self, q_region: torch.Tensor, k_region: torch.Tensor, rh: int, rw: int, H: int, W: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        S = self.n_win
        idx = torch.arange(S, device=q_region.device)
        empty = ((idx * rh >= H)[:, None] | (idx * rw >= W)[None, :]).reshape(1, S * S, 1)
        offset = torch.where(empty, -1e30, 0.0).to(torch.float32).expand(k_region.shape[0], -1, -1)
        ones = torch.ones_like(offset)
        return torch.cat([q_region.float(), ones], -1), torch.cat([k_region.float(), offset], -1)


@register_notrace_module
class AttentionLePE(nn.Module):
    """Global multi-head attention + LCE on the attention input (official stage 4, NHWC).

    Input and output ``(B, H, W, C)``. The softmax is written out rather than SDPA: the map is 7x7 at 224, and
    FLOP counters (``FlopCounterMode`` on CPU) do not count SDPA's fused CPU kernel, so GMACs would be low.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        qkv_bias: bool = False,
        lce_kernel: int = 5,
        device=None,
        dtype=None,
    ):
        dd = dict(device=device, dtype=dtype)
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim={dim} must be divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias, **dd)
        self.proj = nn.Linear(dim, dim, **dd)
        self.lepe = _lce_conv(dim, lce_kernel, **dd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, H, W, C) -> (B, H, W, C)``."""
        B, H, W, C = x.shape
        qkv = self.qkv(x).reshape(B, H * W, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        attn = ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)
        out = (attn @ v).transpose(1, 2).reshape(B, H, W, C)
        out = out + self.lepe(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)  # LCE on the input, not on V
        return self.proj(out)


class Block(nn.Module):
    """Depthwise positional conv, then pre-norm attention and MLP residuals. ``(B, C, H, W)`` in and out."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        topk: int,
        n_win: int = 7,
        qk_dim: int | None = None,
        qk_scale: float | None = None,
        mlp_ratio: float = 3.0,
        lce_kernel: int = 5,
        pos_conv_kernel: int = 3,
        global_heads: int = 8,
        drop_path: float = 0.0,
        norm_eps: float = 1e-6,
        pad_mode: str = "original",
        attn_backend: str | None = None,
        device=None,
        dtype=None,
    ):
        """
        Args:
            topk: ``> 0``: BRA with this many routed regions; ``-2``: global attention + LCE (stage 4).
            pos_conv_kernel: depthwise positional conv before attention; 0 for none (STL).
            global_heads: heads of the global attention (8 in every official model, whatever the width).
        """
        dd = dict(device=device, dtype=dtype)
        super().__init__()
        if pos_conv_kernel > 0:
            self.pos_conv = nn.Conv2d(dim, dim, pos_conv_kernel, padding=pos_conv_kernel // 2, groups=dim, **dd)
        else:
            self.pos_conv = None
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps, **dd)
        if topk > 0:
            self.attn = BiLevelRoutingAttention(
                dim, num_heads, n_win=n_win, topk=topk, qk_dim=qk_dim, qk_scale=qk_scale, lce_kernel=lce_kernel,
                pad_mode=pad_mode, attn_backend=attn_backend, **dd,
            )  # fmt: skip
        elif topk == -2:
            self.attn = AttentionLePE(dim, num_heads=global_heads, lce_kernel=lce_kernel, **dd)
        else:
            raise ValueError(f"topk={topk}: expected > 0 (bi-level routing) or -2 (global attention + LCE)")
        self.drop_path1 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps, **dd)
        self.mlp = Mlp(dim, int(mlp_ratio * dim), act_layer=nn.GELU, **dd)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pos_conv is not None:
            x = x + self.pos_conv(x)
        x = x.permute(0, 2, 3, 1)  # attention and MLP work channels last
        x = x + self.drop_path1(self.attn(self.norm1(x)))
        # the last residual sum is taken channels-first: the block returns a new tensor, not a permuted view
        # (FSDP2 warns on every rank about a block that returns a view)
        return x.permute(0, 3, 1, 2) + self.drop_path2(self.mlp(self.norm2(x))).permute(0, 3, 1, 2)


class Stem(nn.Module):
    """Stride-4 stem: two conv3x3-s2 + BN (GELU between) for T/S/B, or one conv4x4-s4 + BN (STL)."""

    def __init__(self, in_chans: int, out_chs: int, stem_type: str = "overlap", device=None, dtype=None):
        dd = dict(device=device, dtype=dtype)
        super().__init__()
        if stem_type == "overlap":
            mid = out_chs // 2
            self.conv1 = nn.Conv2d(in_chans, mid, 3, stride=2, padding=1, **dd)
            self.norm1 = nn.BatchNorm2d(mid, **dd)
            self.act = nn.GELU()
            self.conv2 = nn.Conv2d(mid, out_chs, 3, stride=2, padding=1, **dd)
            self.norm2 = nn.BatchNorm2d(out_chs, **dd)
        elif stem_type == "patch":
            self.conv1 = nn.Conv2d(in_chans, out_chs, 4, stride=4, **dd)
            self.norm1 = nn.BatchNorm2d(out_chs, **dd)
            self.act = self.conv2 = self.norm2 = nn.Identity()
        else:
            raise ValueError(f"stem_type={stem_type!r}; expected 'overlap' (T/S/B) or 'patch' (STL)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, in_chans, H, W) -> (B, C, ceil(H/4), ceil(W/4))``."""
        return self.norm2(self.conv2(self.act(self.norm1(self.conv1(x)))))


class Downsample(nn.Module):
    """Stride-2 downsampler: conv3x3-s2 + BN (T/S/B) or BN + conv2x2-s2 (STL, ``norm_first``)."""

    def __init__(self, in_chs: int, out_chs: int, norm_first: bool = False, device=None, dtype=None):
        dd = dict(device=device, dtype=dtype)
        super().__init__()
        self.norm_first = norm_first
        if norm_first:
            self.norm = nn.BatchNorm2d(in_chs, **dd)
            self.conv = nn.Conv2d(in_chs, out_chs, 2, stride=2, **dd)
        else:
            self.conv = nn.Conv2d(in_chs, out_chs, 3, stride=2, padding=1, **dd)
            self.norm = nn.BatchNorm2d(out_chs, **dd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.norm_first:
            return self.conv(self.norm(x))
        return self.norm(self.conv(x))


class BiFormerStage(nn.Module):
    """Optional downsampler, then ``depth`` blocks. ``(B, C_in, H, W) -> (B, C, H', W')``."""

    def __init__(self, downsample: nn.Module, blocks: Sequence[nn.Module]):
        super().__init__()
        self.downsample = downsample
        self.blocks = nn.Sequential(*blocks)
        self.grad_checkpointing = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.downsample(x)
        # checkpoint the blocks only: recomputing a BatchNorm in train mode would update its stats twice
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint_seq(self.blocks, x)
        return self.blocks(x)


def _per_stage(value: Any, name: str, n: int = 4) -> tuple:
    values = tuple(value) if isinstance(value, Sequence) else (value,) * n
    if len(values) != n:
        raise ValueError(f"{name}={value!r}: expected one value or {n}")
    return values


def _check_sizes(
    in_chans: int,
    num_classes: int,
    embed_dims: tuple[int, ...],
    qk_dims: tuple[int, ...],
    head_dim: int,
    n_wins: tuple[int, ...],
    topks: tuple[int, ...],
    global_heads: int,
) -> None:
    """Sizes a BiFormer cannot be built with, named (a direct build does not pass zoo.create_model's checks)."""
    if in_chans < 1 or num_classes < 0 or head_dim < 1 or global_heads < 1:
        raise ValueError(
            f"in_chans={in_chans}, num_classes={num_classes}, head_dim={head_dim}, global_heads={global_heads}: "
            "expected in_chans, head_dim and global_heads >= 1 and num_classes >= 0"
        )
    for i, (dim, qk_dim, n_win, topk) in enumerate(zip(embed_dims, qk_dims, n_wins, topks)):
        if dim < 1 or n_win < 1:
            raise ValueError(f"stage {i}: embed_dims {dim} and n_win {n_win} must be >= 1")
        if topk != -2 and topk < 1:  # the upper bound (n_win**2 regions) is the attention's own check
            raise ValueError(
                f"topks={topks}: stage {i} has topk={topk}; expected >= 1 routed regions or -2 (global "
                "attention + LCE, the last stage of every official variant)"
            )
        if topk > 0 and qk_dim < head_dim:
            raise ValueError(
                f"stage {i}: qk_dims {qk_dim} < head_dim={head_dim} gives no attention head (heads = qk_dim // "
                f"head_dim); pass head_dim <= {qk_dim}"
            )


class BiFormer(nn.Module):
    """BiFormer backbone and classifier, timm model contract.

    ``forward_features``: ``(B, in_chans, H, W) -> (B, embed_dims[-1], ceil(H/32), ceil(W/32))`` (after the
    pre-head BatchNorm2d); ``forward_head``: global pool (+ dropout) + ``head.fc``.
    """

    def __init__(
        self,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "avg",
        depths: Sequence[int] = (2, 2, 8, 2),
        embed_dims: Sequence[int] = (64, 128, 256, 512),
        qk_dims: Sequence[int] | None = None,
        head_dim: int = 32,
        n_win: int | Sequence[int] = 7,
        topks: Sequence[int] = (1, 4, 16, -2),
        mlp_ratios: float | Sequence[float] = 3.0,
        lce_kernel: int = 5,
        pos_conv_kernel: int = 3,
        global_heads: int = 8,
        qk_scale: float | None = None,
        stem_type: str = "overlap",
        downsample_norm_first: bool = False,
        norm_eps: float = 1e-6,
        pad_mode: str = "original",
        attn_backend: str | None = None,
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        device=None,
        dtype=None,
    ):
        """
        Args:
            in_chans: input channels.
            num_classes: classes of ``head.fc``; 0 for no classifier.
            global_pool: ``'avg'`` (the original's mean), any timm ``SelectAdaptivePool2d`` type, '' for none.
            depths, embed_dims: blocks and channels per stage.
            qk_dims: BRA Q/K widths per stage, ``embed_dims`` by default (all released models).
            head_dim: BRA head width: stage i has ``qk_dims[i] // head_dim`` heads.
            n_win: regions per side in BRA stages (7 for classification; detection 16, segmentation 8).
            topks: routed regions per stage; ``-2`` = global attention + LCE (stage 4 of every variant).
            mlp_ratios: MLP expansion per stage (3 for T/S/B, 4 for STL).
            lce_kernel: depthwise conv kernel of the local context enhancement.
            pos_conv_kernel: depthwise positional conv before each block's attention; 0 for none (STL).
            global_heads: heads of the global attention (8, hard-coded in the official code).
            qk_scale: BRA temperature; ``qk_dim ** -0.5`` by default (official).
            stem_type: ``'overlap'`` (2 x conv3x3-s2, T/S/B) or ``'patch'`` (conv4x4-s4, STL).
            downsample_norm_first: BN before a conv2x2-s2 (STL) instead of conv3x3-s2 before BN.
            norm_eps: LayerNorm eps of the blocks.
            pad_mode: BRA padding, ``'original'`` (default), ``'masked'`` or ``'none'`` (module docstring).
            attn_backend: ``zoo.ops.routed_attention`` backend for every BRA, None for the dispatch's choice.
            drop_rate: dropout before ``head.fc`` (the original ignores it; default 0 is the same model).
            drop_path_rate: stochastic depth, linear from 0 over all blocks.
        """
        dd = dict(device=device, dtype=dtype)
        super().__init__()
        if pad_mode not in PAD_MODES:
            raise ValueError(f"pad_mode={pad_mode!r}; expected one of {PAD_MODES}")
        depths = tuple(depths)
        num_stages = len(depths)
        if not num_stages or any(d < 0 for d in depths):
            raise ValueError(f"depths={depths}: expected one block count >= 0 per stage, e.g. (2, 2, 8, 2)")
        embed_dims = _per_stage(embed_dims, "embed_dims", num_stages)
        qk_dims = _per_stage(qk_dims or embed_dims, "qk_dims", num_stages)
        n_wins = _per_stage(n_win, "n_win", num_stages)
        topks = _per_stage(topks, "topks", num_stages)
        mlp_ratios = _per_stage(mlp_ratios, "mlp_ratios", num_stages)
        _check_sizes(in_chans, num_classes, embed_dims, qk_dims, head_dim, n_wins, topks, global_heads)
        self.num_classes = num_classes
        self.drop_rate = drop_rate
        self.depths = depths
        self.embed_dims = embed_dims
        self.stem_type = stem_type
        self.grad_checkpointing = False

        self.stem = Stem(in_chans, embed_dims[0], stem_type=stem_type, **dd)
        dpr = torch.linspace(0, drop_path_rate, sum(depths)).tolist()
        stages, self.feature_info = [], []
        block_idx = 0
        for i in range(num_stages):
            if i == 0:
                downsample = nn.Identity()  # the stem already reduces by 4
            else:
                downsample = Downsample(embed_dims[i - 1], embed_dims[i], norm_first=downsample_norm_first, **dd)
            blocks = [
                Block(
                    embed_dims[i],
                    qk_dims[i] // head_dim,
                    topks[i],
                    n_win=n_wins[i],
                    qk_dim=qk_dims[i],
                    qk_scale=qk_scale,
                    mlp_ratio=mlp_ratios[i],
                    lce_kernel=lce_kernel,
                    pos_conv_kernel=pos_conv_kernel,
                    global_heads=global_heads,
                    drop_path=dpr[block_idx + j],
                    norm_eps=norm_eps,
                    pad_mode=pad_mode,
                    attn_backend=attn_backend,
                    **dd,
                )
                for j in range(depths[i])
            ]
            block_idx += depths[i]
            stages.append(BiFormerStage(downsample, blocks))
            self.feature_info.append(dict(num_chs=embed_dims[i], reduction=4 * 2**i, module=f"stages.{i}"))
        self.stages = nn.Sequential(*stages)
        self.num_features = embed_dims[-1]
        self.norm = nn.BatchNorm2d(self.num_features, **dd)  # pre-head norm on the map, as the original
        self.head = ClassifierHead(self.num_features, num_classes, pool_type=global_pool, drop_rate=drop_rate, **dd)
        # pooled width (x2 for 'catavgmax'); ClassifierHead.num_features is missing in timm 1.0.29
        self.head_hidden_size = self.num_features * self.head.global_pool.feat_mult()
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        # the original's init: trunc-normal Linear, zero bias; convs, BN and LN keep PyTorch defaults
        if isinstance(module, nn.Linear):
            trunc_normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        # nothing beyond the 1-D parameters timm already exempts (the original's names matched nothing)
        return set()

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        return dict(
            stem=r"^stem",
            blocks=r"^stages\.(\d+)"
            if coarse
            else [
                (r"^stages\.(\d+)\.downsample", (0,)),
                (r"^stages\.(\d+)\.blocks\.(\d+)", None),
                (r"^norm", (99999,)),
            ],
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable
        for stage in self.stages:
            stage.grad_checkpointing = enable

    @torch.jit.ignore
    def set_attn_backend(self, backend: str | None) -> None:
        """Route every BRA through ``zoo.ops.routed_attention(backend=...)``; None: the dispatch decides."""
        for module in self.modules():
            if isinstance(module, BiLevelRoutingAttention):
                module.attn_backend = backend

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head.fc

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        self.num_classes = num_classes
        self.head.reset(num_classes, pool_type=global_pool)
        self.head_hidden_size = self.num_features * self.head.global_pool.feat_mult()

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | list[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """Stage outputs ``(B, C_i, H/2^(i+2), W/2^(i+2))`` at ``indices`` (timm's semantics).

        Args:
            indices: last n stages (int) or stage indices (negative allowed); all stages by default.
            norm: apply the pre-head BatchNorm2d to the last stage's output.
            stop_early: stop after the last requested stage.
            output_fmt: only ``'NCHW'``.
            intermediates_only: return only the list.
        Returns:
            ``(forward_features output, [intermediates])`` or the list.
        """
        _assert(output_fmt == "NCHW", "BiFormer: output_fmt must be 'NCHW'")
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        last_idx = len(self.depths) - 1  # the stage the pre-head norm belongs to (not after pruning)
        intermediates = []
        x = self.stem(x)
        stages = self.stages if torch.jit.is_scripting() or not stop_early else self.stages[: max_index + 1]
        feat_idx = 0
        for feat_idx, stage in enumerate(stages):
            x = stage(x)
            if feat_idx in take_indices:
                intermediates.append(self.norm(x) if norm and feat_idx == last_idx else x)
        if intermediates_only:
            return intermediates
        if feat_idx == last_idx:
            x = self.norm(x)
        return x, intermediates

    def prune_intermediate_layers(
        self,
        indices: int | list[int] = 1,
        prune_norm: bool = False,
        prune_head: bool = True,
    ) -> list[int]:
        """Drop the stages after the last index in ``indices`` (and the norm / head); returns the take indices."""
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        self.stages = self.stages[: max_index + 1]
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.reset_classifier(0, "")
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, in_chans, H, W) -> (B, num_features, ceil(H/32), ceil(W/32))``."""
        x = self.stem(x)
        x = self.stages(x)
        return self.norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """``(B, num_features, h, w) -> (B, num_classes)`` or, with ``pre_logits``, ``(B, head_hidden_size)``."""
        return self.head(x, pre_logits=True) if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


# ---------------------------------------------------------------------------------------------------------
# Official checkpoints
# ---------------------------------------------------------------------------------------------------------

# (official key pattern, zoo key template) per layout; applied in order, first match wins
_BLOCK_RENAMES = [  # the pos conv first: global-attention blocks (stage 4) rename only it
    (r"^pos_embed\.", "pos_conv."),
    (r"^attn\.qkv\.qkv\.", "attn.qkv."),
    (r"^attn\.wo\.", "attn.proj."),
]
_TSB_RULES = [
    (r"^downsample_layers\.0\.0\.", "stem.conv1."),
    (r"^downsample_layers\.0\.1\.", "stem.norm1."),
    (r"^downsample_layers\.0\.3\.", "stem.conv2."),
    (r"^downsample_layers\.0\.4\.", "stem.norm2."),
    (r"^downsample_layers\.(\d+)\.0\.", r"stages.\1.downsample.conv."),
    (r"^downsample_layers\.(\d+)\.1\.", r"stages.\1.downsample.norm."),
    (r"^stages\.(\d+)\.(\d+)\.mlp\.0\.", r"stages.\1.blocks.\2.mlp.fc1."),
    (r"^stages\.(\d+)\.(\d+)\.mlp\.3\.", r"stages.\1.blocks.\2.mlp.fc2."),
    (r"^stages\.(\d+)\.(\d+)\.", r"stages.\1.blocks.\2."),
]
_STL_RULES = [
    (r"^downsample_layers\.0\.0\.", "stem.conv1."),
    (r"^downsample_layers\.0\.1\.", "stem.norm1."),
    (r"^downsample_layers\.(\d+)\.0\.", r"stages.\1.downsample.norm."),
    (r"^downsample_layers\.(\d+)\.1\.", r"stages.\1.downsample.conv."),
    (r"^stages\.(\d+)\.blocks\.(\d+)\.mlp\.0\.", r"stages.\1.blocks.\2.mlp.fc1."),
    (r"^stages\.(\d+)\.blocks\.(\d+)\.mlp\.2\.", r"stages.\1.blocks.\2.mlp.fc2."),
]
_HEAD_RULES = [(r"^head\.", "head.fc.")]  # `norm.` (the BatchNorm2d) keeps its name

# inverse direction: zoo key pattern -> official template
_TSB_INVERSE = [
    (r"^stem\.conv1\.", "downsample_layers.0.0."),
    (r"^stem\.norm1\.", "downsample_layers.0.1."),
    (r"^stem\.conv2\.", "downsample_layers.0.3."),
    (r"^stem\.norm2\.", "downsample_layers.0.4."),
    (r"^stages\.(\d+)\.downsample\.conv\.", r"downsample_layers.\1.0."),
    (r"^stages\.(\d+)\.downsample\.norm\.", r"downsample_layers.\1.1."),
    (r"^stages\.(\d+)\.blocks\.(\d+)\.mlp\.fc1\.", r"stages.\1.\2.mlp.0."),
    (r"^stages\.(\d+)\.blocks\.(\d+)\.mlp\.fc2\.", r"stages.\1.\2.mlp.3."),
    (r"^stages\.(\d+)\.blocks\.(\d+)\.", r"stages.\1.\2."),
]
_STL_INVERSE = [
    (r"^stem\.conv1\.", "downsample_layers.0.0."),
    (r"^stem\.norm1\.", "downsample_layers.0.1."),
    (r"^stages\.(\d+)\.downsample\.norm\.", r"downsample_layers.\1.0."),
    (r"^stages\.(\d+)\.downsample\.conv\.", r"downsample_layers.\1.1."),
    (r"^stages\.(\d+)\.blocks\.(\d+)\.mlp\.fc1\.", r"stages.\1.blocks.\2.mlp.0."),
    (r"^stages\.(\d+)\.blocks\.(\d+)\.mlp\.fc2\.", r"stages.\1.blocks.\2.mlp.2."),
]
_HEAD_INVERSE = [(r"^head\.fc\.", "head.")]

# official configurations, to name the variant a checkpoint belongs to: (layout, depths, dims) -> name
_KNOWN_VARIANTS = {
    ("overlap", (2, 2, 8, 2), (64, 128, 256, 512)): "biformer_tiny",
    ("overlap", (4, 4, 18, 4), (64, 128, 256, 512)): "biformer_small",
    ("overlap", (4, 4, 18, 4), (96, 192, 384, 768)): "biformer_base",
    ("patch", (2, 2, 6, 2), (96, 192, 384, 768)): "biformer_stl",
}


def _rename(key: str, rules: list[tuple[str, str]]) -> str:
    for pattern, template in rules:
        new_key, n = re.subn(pattern, template, key, count=1)
        if n:
            return new_key
    return key


def _official_to_zoo_key(key: str, stl: bool) -> str:
    key = _rename(key, (_STL_RULES if stl else _TSB_RULES) + _HEAD_RULES)
    if key.startswith("stages.") and ".blocks." in key:
        prefix, _, suffix = key.partition(".blocks.")
        block, _, rest = suffix.partition(".")
        key = f"{prefix}.blocks.{block}.{_rename(rest, _BLOCK_RENAMES)}"
    return key


def _official_config(state_dict: dict[str, torch.Tensor]) -> tuple[str, tuple[int, ...], tuple[int, ...]]:
    """(stem layout, depths, dims) of an official-format state dict."""
    stl = any(re.match(r"^stages\.\d+\.blocks\.", k) for k in state_dict)
    block_re = re.compile(r"^stages\.(\d+)\.(?:blocks\.)?(\d+)\.norm1\.weight$")
    depth: dict[int, int] = {}
    dims: dict[int, int] = {}
    for key, value in state_dict.items():
        m = block_re.match(key)
        if m:
            i, j = int(m.group(1)), int(m.group(2))
            depth[i] = max(depth.get(i, 0), j + 1)
            dims[i] = int(value.shape[0])
    stages = sorted(depth)
    return ("patch" if stl else "overlap"), tuple(depth[i] for i in stages), tuple(dims[i] for i in stages)


def _describe(layout: str, depths: tuple[int, ...], dims: tuple[int, ...]) -> str:
    name = _KNOWN_VARIANTS.get((layout, tuple(depths), tuple(dims)))
    desc = f"depths {tuple(depths)}, dims {tuple(dims)}, {'STL' if layout == 'patch' else 'T/S/B'} stem"
    return f"{name} ({desc})" if name else desc


def checkpoint_filter_fn(state_dict: dict[str, Any], model: BiFormer) -> dict[str, torch.Tensor]:
    """Map an official BiFormer checkpoint (T/S/B/STL legacy layout) to zoo's keys; zoo dicts pass through.

    Accepts the bare state dict or the training checkpoint (weights under ``'model'``, or ``'state_dict'``);
    strips DDP ``module.`` prefixes. The classifier and the first conv are left to timm's loader (it drops a
    mismatched head and adapts ``in_chans``).

    Raises:
        BiFormerCheckpointError: not a BiFormer checkpoint, or one of another variant than ``model``.
    """
    for container in ("model", "state_dict"):
        if isinstance(state_dict.get(container), dict):
            state_dict = state_dict[container]
            break
    state_dict = {k.removeprefix("module."): v for k, v in state_dict.items()}
    if "stem.conv1.weight" in state_dict:
        return state_dict  # already zoo's layout: idempotent
    if not any(k.startswith("downsample_layers.0.") for k in state_dict):
        sample = ", ".join(list(state_dict)[:4])
        raise BiFormerCheckpointError(
            f"not a BiFormer checkpoint: no 'downsample_layers.0.*' (official) nor 'stem.conv1.weight' (zoo) "
            f"keys; first keys: {sample}"
        )
    found = _official_config(state_dict)
    expected = (model.stem_type, tuple(model.depths), tuple(model.embed_dims))
    if found != expected:
        raise BiFormerCheckpointError(
            f"checkpoint is {_describe(*found)} but the model is {_describe(*expected)}: "
            f"build the model that matches the checkpoint (e.g. zoo.create_model('{_KNOWN_VARIANTS.get(found, '?')}', "
            "pretrained=True, pretrained_cfg_overlay=dict(file=...)))"
        )
    stl = found[0] == "patch"
    out = {_official_to_zoo_key(k, stl): v for k, v in state_dict.items()}
    # shapes other than the classifier's and the first conv's (timm adapts those) must match the model
    model_sd = model.state_dict()
    bad = [
        f"{k} {tuple(v.shape)} vs {tuple(model_sd[k].shape)}"
        for k, v in out.items()
        if k in model_sd and v.shape != model_sd[k].shape and not k.startswith(("head.fc.", "stem.conv1.weight"))
    ]
    if bad:
        raise BiFormerCheckpointError(
            f"checkpoint ({_describe(*found)}) does not fit the model: shape mismatch in " + "; ".join(bad[:5])
        )
    return out


def checkpoint_to_official(state_dict: dict[str, torch.Tensor], stl: bool = False) -> dict[str, torch.Tensor]:
    """Inverse of ``checkpoint_filter_fn``: zoo keys -> official keys (``stl=True`` for the STL layout).

    Save ``{'model': checkpoint_to_official(model.state_dict())}`` to get a file the official code loads.
    A block is BRA (official ``attn.qkv.qkv``) when its ``attn.qkv`` has a bias; global attention has none.
    """
    block_inverse = [("^" + re.escape(new), old.strip("^").replace("\\", "")) for old, new in _BLOCK_RENAMES]
    out = {}
    for key, value in state_dict.items():
        if key.startswith("stages.") and ".blocks." in key:
            prefix, _, suffix = key.partition(".blocks.")
            block, _, rest = suffix.partition(".")
            is_bra = f"{prefix}.blocks.{block}.attn.qkv.bias" in state_dict
            rules = block_inverse if is_bra else block_inverse[:1]  # global attention keeps qkv / proj names
            key = f"{prefix}.blocks.{block}.{_rename(rest, rules)}"
        out[_rename(key, (_STL_INVERSE if stl else _TSB_INVERSE) + _HEAD_INVERSE)] = value
    return out


# ---------------------------------------------------------------------------------------------------------
# Factory, cfgs, variants
# ---------------------------------------------------------------------------------------------------------


def _check_checkpoint_file(path: str) -> None:
    """Fail early, naming the file, on a truncated or foreign weight file (torch's own errors do not)."""
    p = Path(path)
    if not p.is_file() or p.suffix == ".safetensors":
        return  # missing files: the factory's error; safetensors: its own header checks are clear
    with open(p, "rb") as f:
        head = f.read(4)
    size = p.stat().st_size
    if head.startswith(b"PK\x03\x04"):
        if not zipfile.is_zipfile(p):
            raise BiFormerCheckpointError(
                f"checkpoint file {path} ({size} bytes) is truncated or corrupted: its zip directory is missing; "
                "download it again (official files are ~50-230 MB)"
            )
    elif not head.startswith(b"\x80"):  # neither torch's zip format nor a legacy pickle
        raise BiFormerCheckpointError(
            f"checkpoint file {path} ({size} bytes) is not a PyTorch checkpoint (first bytes {head!r}); expected "
            "the official .pth (torch.save) or a .safetensors file"
        )


def _create_biformer(variant: str, pretrained: bool = False, **kwargs: Any) -> BiFormer:
    if pretrained:
        cfg = resolve_pretrained_cfg(
            variant,
            pretrained_cfg=kwargs.get("pretrained_cfg"),
            pretrained_cfg_overlay=kwargs.get("pretrained_cfg_overlay"),
        )
        if cfg.file and cfg.state_dict is None:
            _check_checkpoint_file(cfg.file)
    out_indices = kwargs.pop("out_indices", (0, 1, 2, 3))
    return build_model_with_cfg(
        BiFormer,
        variant,
        pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=out_indices, flatten_sequential=True),
        **kwargs,
    )


def _cfg(url: str = "", **kwargs: Any) -> dict[str, Any]:
    return {
        "url": url,
        "num_classes": 1000,
        "input_size": (3, 224, 224),
        "pool_size": (7, 7),
        "crop_pct": 0.875,
        "interpolation": "bicubic",
        "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD,
        "first_conv": "stem.conv1",
        "classifier": "head.fc",
        "license": "mit",
        "paper_ids": "arXiv:2303.08810",
        "paper_name": "BiFormer: Vision Transformer with Bi-Level Routing Attention",
        "origin_url": "https://github.com/rayleizhu/BiFormer",
        **kwargs,
    }


_ONEDRIVE = "https://api.onedrive.com/v1.0/shares/{}/root/content"
_NOTES = (
    "official weights (OneDrive share, availability doubtful: rayleizhu/BiFormer issues #15, #53)",
    "the URL ends in 'content': cache the download as the official file name {} so variants do not collide",
)

default_cfgs = generate_default_cfgs(
    {
        "biformer_tiny.in1k": _cfg(
            url=_ONEDRIVE.format("s!AkBbczdRlZvChHEOoGkgwgQzEDlM"),
            notes=(_NOTES[0], _NOTES[1].format("biformer_tiny_in1k.pth")),
        ),
        "biformer_small.in1k": _cfg(
            url=_ONEDRIVE.format("s!AkBbczdRlZvChHDyM-x9KWRBZ832"),
            notes=(_NOTES[0], _NOTES[1].format("biformer_small_in1k.pth")),
        ),
        "biformer_base.in1k": _cfg(
            url=_ONEDRIVE.format("s!AkBbczdRlZvChHI_XPhoadjaNxtO"),
            notes=(_NOTES[0], _NOTES[1].format("biformer_base_in1k.pth")),
        ),
        "biformer_stl.in1k": _cfg(
            url=_ONEDRIVE.format("s!AkBbczdRlZvChSf-m7ujkvx9lIQ1"),
            notes=(_NOTES[0], _NOTES[1].format("biformer_stl_in1k.pth")),
        ),
    }
)

# Card facts: what the family is and where its numbers come from.
FAMILY = dict(
    name="BiFormer",
    title="BiFormer: Vision Transformer with Bi-Level Routing Attention",
    paper_ids="arXiv:2303.08810",
    origin_url="https://github.com/rayleizhu/BiFormer",
    implementation="zoo (`zoo.models.biformer`): official architecture, bi-level routing attention on "
    "`zoo.ops.region_routing` / `zoo.ops.routed_attention`; loads the official checkpoints",
    citation="""@inproceedings{zhu2023biformer,
  title={BiFormer: Vision Transformer with Bi-Level Routing Attention},
  author={Zhu, Lei and Wang, Xinjiang and Ke, Zhanghan and Zhang, Wayne and Lau, Rynson},
  booktitle={Proceedings of the IEEE/CVF Conference on Computer Vision and Pattern Recognition (CVPR)},
  year={2023}
}""",
    reported_top1={
        "biformer_tiny.in1k": 81.4,
        "biformer_small.in1k": 83.8,
        "biformer_base.in1k": 84.3,
        "biformer_stl.in1k": 82.7,
    },
    reported_source="official README (rayleizhu/BiFormer), ImageNet-1k top-1 at 224, crop 0.875 bicubic; "
    "not re-measured by zoo",
)


@register_model
def biformer_tiny(pretrained: bool = False, **kwargs: Any) -> BiFormer:
    """BiFormer-T: 13.1 M params, 2.2 GMACs at 224."""
    model_args = dict(depths=(2, 2, 8, 2), embed_dims=(64, 128, 256, 512), mlp_ratios=3)
    return _create_biformer("biformer_tiny", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def biformer_small(pretrained: bool = False, **kwargs: Any) -> BiFormer:
    """BiFormer-S: 25.5 M params, 4.5 GMACs at 224."""
    model_args = dict(depths=(4, 4, 18, 4), embed_dims=(64, 128, 256, 512), mlp_ratios=3)
    return _create_biformer("biformer_small", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def biformer_base(pretrained: bool = False, **kwargs: Any) -> BiFormer:
    """BiFormer-B: 56.8 M params, 9.8 GMACs at 224."""
    model_args = dict(depths=(4, 4, 18, 4), embed_dims=(96, 192, 384, 768), mlp_ratios=3)
    return _create_biformer("biformer_base", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def biformer_stl(pretrained: bool = False, **kwargs: Any) -> BiFormer:
    """BiFormer-STL (Swin-T layout ablation): 28.4 M params, 4.6 GMACs at 224."""
    model_args = dict(
        depths=(2, 2, 6, 2), embed_dims=(96, 192, 384, 768), mlp_ratios=4, pos_conv_kernel=0, stem_type="patch",
        downsample_norm_first=True,
    )  # fmt: skip
    return _create_biformer("biformer_stl", pretrained=pretrained, **dict(model_args, **kwargs))
