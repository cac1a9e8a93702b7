"""HaloNet (Vaswani et al., CVPR 2021, arXiv:2103.12731) on zoo's halo-attention op, inputs of any size.

The paper released no code; timm's ``byoanet`` models are the de-facto reference. Zoo reuses timm's
``ByobNet`` machinery and timm's model configs (``timm.models.byoanet.model_cfgs``) unchanged and swaps only
the halo layer: :class:`ZooHaloAttn` subclasses timm's ``HaloAttn`` (same parameters, same names ``q``,
``kv``, ``pos_embed.height_rel``, ``pos_embed.width_rel``), so a timm state dict loads strictly, and its
forward calls :func:`zoo.ops.halo_attention` (fused Triton kernel on CUDA, PyTorch elsewhere; the model kwarg
``attn_backend`` or :meth:`HaloNet.set_attn_backend` forces a backend). Lambda and bottleneck-attention layers
of the hybrid models stay timm's. timm's own models are untouched: the zoo layer is handed to ``ByobNet``
through the config, never registered under timm's ``'halo'`` name.

Architectures:

* timm's halo models, same names in zoo's registry (timm's registry keeps timm's): ``halonet26t``,
  ``sehalonet33ts``, ``halonet50ts``, ``eca_halonext26ts``, ``haloregnetz_b``, ``lamhalobotnet50ts_256``,
  ``halo2botnet50ts_256``, ``halonet_h1``. Their pretrained cfgs are timm's (weights under ``timm/``), without
  timm's ``min_input_size``: zoo takes any input size. The two ``*_256`` hybrids keep timm's
  ``fixed_input_size`` (their stage-4 bottleneck attention has feature-size-bound relative positions).
* The paper's family ``halonet_h0`` ... ``halonet_h7`` (second-hand table, see ``FAMILY['notes']``): all-attention
  bottleneck nets, stage widths ``w = 64, 128, 256, 512`` and heads 4/8/8/8; a block is
  1x1 conv ``c_in -> w`` | halo attention ``w -> r_v * w`` (query/key width ``w``, value width ``r_v * w``) |
  BN-act | 1x1 conv ``r_v * w -> r_b * w``; 7x7 stem + max-pool, ReLU, optional final 1x1 conv to ``d_f``.
  With r_v = r_b = 1 this is timm's ``halonet_h1`` layout (zoo's ``halonet_h1`` *is* timm's layout, 8 heads in
  every stage, so timm's checkpoints load). Parameter counts match the paper's table within 0.5%.

Inputs of any size: the op pads every layer's key map to whole ``block_size`` blocks internally (no copy on
the Triton path) and the query map to whole query blocks; outputs are cut back to the map. Which keys outside
the map take part in the softmax is ``halo_pad_mask`` (model kwarg, or :meth:`HaloNet.set_halo_pad_mask`):

* ``None`` (default, "auto"): a layer whose map is a multiple of ``block_size`` runs timm's numerics exactly
  (zero keys/values in the halo beyond the border take softmax weight through their relative logits); a
  layer whose map is not (where timm's ``HaloAttn`` raises) masks every key outside the map, so the padding
  added to complete the blocks gets no weight. Outputs equal timm's wherever timm runs (fp32, 1e-5);
  masking changes them only where padding exists.
* ``False``: never mask (timm's zero-key semantics, extended to the completion padding).
* ``True``: always mask every key outside the map, the border halo included: outputs differ from timm's
  at border blocks even at multiples of 256 (a clean "no zero keys" variant for training from scratch).

Memory: on the PyTorch path (no CUDA) the op materialises the unfolded K/V windows and the attention matrix;
in training :class:`ZooHaloAttn` recomputes the op in backward instead of keeping them (``halo_recompute``;
``None`` = on exactly when the input is not on CUDA, where the fused kernel already keeps only q, k, v, out).
Every BN + activation, and each block's tail ``act(bn3(conv3) + shortcut)``, keeps only its input for backward
and recomputes the elementwise rest (``lean_norm_act=True``, default; :mod:`zoo.layers.norm_act`): the
activation maps plain autograd would also store are never kept. Forward outputs and running statistics are
bitwise timm's; only training memory changes.
"""

from __future__ import annotations

from dataclasses import replace
from functools import partial
from typing import Any

import torch
import torch.nn as nn
import torch.utils.checkpoint
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import ConvNormAct, _assert
from timm.layers._fx import register_notrace_function, register_notrace_module
from timm.layers.bottleneck_attn import BottleneckAttn
from timm.layers.halo_attn import HaloAttn
from timm.models import build_model_with_cfg, generate_default_cfgs
from timm.models._registry import _model_default_cfgs
from timm.models.byoanet import model_cfgs as timm_model_cfgs
from timm.models.byobnet import (
    BottleneckBlock,
    ByoBlockCfg,
    ByobNet,
    ByoModelCfg,
    DownsampleAvg,
    LayerFn,
    SelfAttnBlock,
)

from .. import ops
from .._registry import register_model
from ..layers.norm_act import batch_norm_act, lean_batch_norm_act_

__all__ = [
    "HaloNet",
    "ZooHaloAttn",
    "ValueExpandedSelfAttnBlock",
    "LeanBottleneckBlock",
    "LeanSelfAttnBlock",
    "checkpoint_filter_fn",
    "FAMILY",
    "PAPER_PARAMS_M",
    "model_cfgs",
]

# Card facts: what the family is and where its numbers come from.
FAMILY = dict(
    name="HaloNet",
    title="Scaling Local Self-Attention for Parameter Efficient Visual Backbones (HaloNet)",
    paper_ids="arXiv:2103.12731",
    origin_url="https://github.com/huggingface/pytorch-image-models/blob/main/timm/models/byoanet.py",
    implementation="zoo: timm's ByobNet with `zoo.ops.halo_attention` in place of timm's HaloAttn "
    "(timm state dicts load strictly; outputs equal timm's within 1e-5 fp32 at multiples of 256)",
    citation="""@inproceedings{vaswani2021scaling,
  title={Scaling Local Self-Attention for Parameter Efficient Visual Backbones},
  author={Vaswani, Ashish and Ramachandran, Prajit and Srinivas, Aravind and Parmar, Niki and Hechtman, Blake
    and Shlens, Jonathon},
  booktitle={CVPR},
  year={2021}
}""",
    reported_top1={
        # timm results-imagenet.csv (256 unless noted; haloregnetz_b at 224)
        "halonet26t.a1h_in1k": 79.134,
        "sehalonet33ts.ra2_in1k": 80.976,
        "halonet50ts.a1h_in1k": 81.640,
        "eca_halonext26ts.c1_in1k": 79.518,
        "haloregnetz_b.ra3_in1k": 81.058,
        "lamhalobotnet50ts_256.a1h_in1k": 81.552,
        "halo2botnet50ts_256.a1h_in1k": 82.084,
        # the paper's H-family table, second-hand (no weights released; train/test res of each variant)
        "halonet_h0.untrained": 77.9,
        "halonet_h1.untrained": 79.9,
        "halonet_h2.untrained": 80.4,
        "halonet_h3.untrained": 81.9,
        "halonet_h4.untrained": 83.3,
        "halonet_h5.untrained": 84.0,
        "halonet_h6.untrained": 84.4,
        "halonet_h7.untrained": 84.9,
    },
    reported_source="timm results-imagenet.csv for the timm-trained weights (256 px, haloregnetz_b 224 px); "
    "paper Table for halonet_h0..h7 (second-hand, no weights)",
    notes="The paper's H0-H7 numbers (params, top-1, block/halo sizes, r_v, r_b, depths, d_f, resolutions) are "
    "**second-hand**: the paper released no code or weights, and the table is the keras_cv_attention_models "
    "reconstruction quoted in the project's HaloNet spec; zoo's H-family layout is a reconstruction that "
    "matches the table's parameter counts within 0.5%, not a verified copy of the authors' networks. "
    "`halonet_h1` keeps timm's layout (8 heads in every stage). The timm-trained weights are Ross Wightman's "
    "(timm `v0.1-attn-weights`, Hub `timm/<arch>.<tag>`); their top-1 is timm's results CSV. Inputs of any size "
    "work (layers pad to the block grid; `halo_pad_mask` decides whether padded keys are masked).",
)


# ------------------------------------------------------------------------------------------------ layers


class ZooHaloAttn(HaloAttn):
    """timm's ``HaloAttn`` (same parameters and names) computed by :func:`zoo.ops.halo_attention`, any map size.

    Input ``(B, C, H, W)``; output ``(B, dim_out, ceil(H / stride), ceil(W / stride))``. The key map is padded
    to whole ``block_size`` blocks inside the op; see the module docstring for ``pad_mask``.

    Args (beyond timm's ``HaloAttn``):
        pad_mask: ``None`` (auto: mask keys outside the map only when this layer's map is not a multiple of
            ``block_size``), ``False`` (never, timm's numerics), ``True`` (always, border halo included).
        recompute: recompute the op in backward rather than keep its intermediates; ``None``: when training
            off CUDA (the PyTorch path keeps the unfolded windows and the attention matrix, the kernel does not).
        attn_backend: ``zoo.ops.halo_attention`` backend (``"triton"``, ``"triton_key_blocks"``, ``"torch"``), None
            for the dispatch's choice.
    """

    def __init__(
        self,
        dim: int,
        dim_out: int | None = None,
        feat_size: tuple[int, int] | None = None,
        stride: int = 1,
        num_heads: int = 8,
        dim_head: int | None = None,
        block_size: int = 8,
        halo_size: int = 3,
        qk_ratio: float = 1.0,
        qkv_bias: bool = False,
        avg_down: bool = False,
        scale_pos_embed: bool = False,
        pad_mask: bool | None = None,
        recompute: bool | None = None,
        attn_backend: str | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(
            dim, dim_out=dim_out, feat_size=feat_size, stride=stride, num_heads=num_heads, dim_head=dim_head,
            block_size=block_size, halo_size=halo_size, qk_ratio=qk_ratio, qkv_bias=qkv_bias, avg_down=avg_down,
            scale_pos_embed=scale_pos_embed, device=device, dtype=dtype,
        )  # fmt: skip
        if isinstance(self.pool, nn.AvgPool2d):
            # odd maps: ceil like the strided convs of the shortcut and of timm's other blocks (same at even sizes)
            self.pool = nn.AvgPool2d(2, 2, ceil_mode=True)
        self.pad_mask = pad_mask
        self.recompute = recompute
        self.attn_backend = attn_backend

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pad_mask: bool) -> torch.Tensor:
        rel_pos = (self.pos_embed.height_rel, self.pos_embed.width_rel)
        return ops.halo_attention(
            q, k, v, self.block_size, self.halo_size, rel_pos, self.scale, self.scale_pos_embed, self.block_stride,
            pad_mask, backend=self.attn_backend or "auto",
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _assert(x.dim() == 4, "ZooHaloAttn expects a (B, C, H, W) map")
        B, _, H, W = x.shape
        nh, d_qk, d_v = self.num_heads, self.dim_head_qk, self.dim_head_v
        q = self.q(x)  # (B, nh * d_qk, ceil(H / s), ceil(W / s)): channel = head * d_qk + j, as timm
        q = q.view(B, nh, d_qk, q.shape[-2], q.shape[-1]).permute(0, 1, 3, 4, 2)
        kv = self.kv(x).view(B, nh, d_qk + d_v, H, W)  # per head [k | v] channels, as timm splits them
        k = kv[:, :, :d_qk].permute(0, 1, 3, 4, 2)
        v = kv[:, :, d_qk:].permute(0, 1, 3, 4, 2)
        pad_mask = self.pad_mask
        if pad_mask is None:  # auto: timm's numerics where timm runs, masked completion padding elsewhere
            pad_mask = H % self.block_size != 0 or W % self.block_size != 0
        recompute = self.recompute
        if recompute is None:
            recompute = x.device.type != "cuda"
        if recompute and self.training and torch.is_grad_enabled():
            # keep q, k, v only; the windows and the (b^2 x win^2) logits are rebuilt in backward
            out = torch.utils.checkpoint.checkpoint(self._attend, q, k, v, pad_mask, use_reentrant=False)
        else:
            out = self._attend(q, k, v, pad_mask)  # (B, nh, Hq, Wq, d_v)
        out = out.permute(0, 1, 4, 2, 3).reshape(B, nh * d_v, out.shape[2], out.shape[3])
        return self.pool(out)


# the op dispatches on sizes and devices in Python: keep it a leaf for torch.fx feature extraction
register_notrace_module(ZooHaloAttn)


def _lean_tail_applies(block: nn.Module) -> bool:
    """The block's tail is ``act(bn3(conv3(.)) + shortcut(x))`` with nothing in between, in a training step."""
    conv3 = block.conv3_1x1
    bn = getattr(conv3, "bn", None)
    return (
        getattr(block, "lean_tail", False)
        and block.training
        and torch.is_grad_enabled()
        and not torch.compiler.is_compiling()
        and block.shortcut is not None
        and isinstance(block.drop_path, nn.Identity)
        and isinstance(getattr(block, "attn_last", nn.Identity()), nn.Identity)
        and getattr(conv3, "aa", None) is None
        and isinstance(bn, nn.BatchNorm2d)
        and isinstance(getattr(bn, "act", None), nn.Identity)
        and isinstance(getattr(bn, "drop", nn.Identity()), nn.Identity)
    )


def _lean_shortcut(shortcut: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, nn.Module | None]:
    """A projection shortcut (conv -> BN, no act) as (conv output, its BN) so the tail normalises it; else
    (shortcut(x), None)."""
    conv_norm = getattr(shortcut, "conv", None) if isinstance(shortcut, DownsampleAvg) else shortcut
    if isinstance(conv_norm, ConvNormAct) and getattr(conv_norm, "aa", None) is None:
        bn = conv_norm.bn
        if isinstance(bn, nn.BatchNorm2d) and isinstance(bn.act, nn.Identity) and isinstance(bn.drop, nn.Identity):
            pooled = shortcut.pool(x) if isinstance(shortcut, DownsampleAvg) else x
            return conv_norm.conv(pooled), bn
    return shortcut(x), None


class LeanBottleneckBlock(BottleneckBlock):
    """timm's ``BottleneckBlock`` whose tail ``act(bn3(conv3) + shortcut)`` keeps only ``conv3``'s output for
    backward in training (:func:`zoo.layers.norm_act.batch_norm_act`); otherwise timm's forward, same keys."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not _lean_tail_applies(self):
            return super().forward(x)
        shortcut, shortcut_bn = _lean_shortcut(self.shortcut, x)
        x = self.attn(self.conv2b_kxk(self.conv2_kxk(self.conv1_1x1(x))))
        return batch_norm_act(self.conv3_1x1.bn, self.conv3_1x1.conv(x), self.act, shortcut, shortcut_bn)


class LeanSelfAttnBlock(SelfAttnBlock):
    """timm's ``SelfAttnBlock`` with the memory-lean tail of :class:`LeanBottleneckBlock`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not _lean_tail_applies(self):
            return super().forward(x)
        shortcut, shortcut_bn = _lean_shortcut(self.shortcut, x)
        x = self.post_attn(self.self_attn(self.conv2_kxk(self.conv1_1x1(x))))
        return batch_norm_act(self.conv3_1x1.bn, self.conv3_1x1.conv(x), self.act, shortcut, shortcut_bn)


def _lean_norm_act_(model: nn.Module) -> None:
    """Memory-lean BN-act layers and block tails in place (only classes change: same parameters and keys)."""
    lean_batch_norm_act_(model)
    for module in model.modules():
        if type(module) is BottleneckBlock:
            module.__class__ = LeanBottleneckBlock
        elif type(module) is SelfAttnBlock:
            module.__class__ = LeanSelfAttnBlock
        if isinstance(module, (LeanBottleneckBlock, LeanSelfAttnBlock)):
            module.lean_tail = True


class ValueExpandedSelfAttnBlock(LeanSelfAttnBlock):
    """timm's ``SelfAttnBlock`` whose attention value width is ``value_ratio`` x the bottleneck width (paper r_v).

    ``(B, in_chs, H, W) -> (B, out_chs, H / stride, W / stride)``: 1x1 ``in -> mid``, halo attention ``mid -> r_v
    * mid`` (query/key width ``mid``), BN-act, 1x1 ``r_v * mid -> out``. ``value_ratio=1`` is timm's block.
    """

    def __init__(self, *, value_ratio: float = 1.0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if value_ratio == 1.0:
            return
        layers: LayerFn = kwargs["layers"]
        dd = {"device": kwargs.get("device"), "dtype": kwargs.get("dtype")}
        mid_chs = self.conv1_1x1.conv.out_channels
        value_chs = int(round(mid_chs * value_ratio))
        # rebuild the three layers whose width changes; query/key width stays mid (dim_head = mid / heads)
        heads = self.self_attn.num_heads
        self.self_attn = layers.self_attn(
            mid_chs, dim_out=value_chs, dim_head=mid_chs // heads, stride=kwargs.get("stride", 1), **dd
        )
        self.post_attn = layers.norm_act(value_chs, **dd)
        self.conv3_1x1 = layers.conv_norm_act(value_chs, kwargs["out_chs"], 1, apply_act=False, **dd)


# ------------------------------------------------------------------------------------------------- model


def _with_zoo_halo(cfg: ByoModelCfg, halo_layer: Any) -> ByoModelCfg:
    """``cfg`` with every ``'halo'`` self-attention (model-wide and per block) replaced by ``halo_layer``."""

    def swap(layer: Any) -> Any:
        return halo_layer if isinstance(layer, str) and layer.lower() == "halo" else layer

    def swap_block(block: ByoBlockCfg | tuple) -> ByoBlockCfg | tuple:
        if isinstance(block, tuple):
            return tuple(swap_block(b) for b in block)
        return replace(block, self_attn_layer=swap(block.self_attn_layer))

    return replace(cfg, blocks=tuple(swap_block(b) for b in cfg.blocks), self_attn_layer=swap(cfg.self_attn_layer))


@register_notrace_function  # for timm's FX feature extraction (autowrapped by identity) ...
@torch.fx.wrap  # ... and for any torch.fx trace: called from HaloNet, whose forward is ByobNet's (not autowrapped)
def _check_fixed_input_size(x: torch.Tensor, fixed_size: tuple[int, int]) -> torch.Tensor:
    """``x`` unchanged if its map is ``fixed_size``, else a ValueError naming both sizes.

    A leaf under torch.fx: the sizes are compared (and written into the message) when the graph runs, not when
    it is traced (a traced size is a Proxy that cannot be iterated or turned into a bool). Returns ``x`` so the
    check is a data dependency that dead-code elimination keeps.
    """
    if x.shape[-2] != fixed_size[0] or x.shape[-1] != fixed_size[1]:
        fh, fw = fixed_size
        raise ValueError(
            f"input {x.shape[-2]}x{x.shape[-1]} does not fit this model: its bottleneck-attention layer has "
            f"relative positions for a {fh}x{fw} input (fixed_input_size); resize the input to {fh}x{fw}"
        )
    return x


class HaloNet(ByobNet):
    """timm's ``ByobNet`` with zoo's halo layer (:class:`ZooHaloAttn`); timm's model contract, timm's keys.

    Args:
        cfg: a ``ByoModelCfg`` whose halo layers are named ``'halo'`` (as timm's ``byoanet.model_cfgs``) or are
            already a :class:`ZooHaloAttn` factory.
        halo_pad_mask: ``None`` / ``False`` / ``True``, see the module docstring.
        halo_recompute: ``None`` / ``False`` / ``True``, recompute the halo op in backward (``None``: off CUDA).
        attn_backend: ``zoo.ops.halo_attention`` backend for every halo layer, None for the dispatch's choice
            (also :meth:`set_attn_backend`).
        lean_norm_act: keep only the input of every BN-act and block tail for backward (training memory; same
            outputs and keys), see the module docstring.
        img_size: input size for the fixed-size hybrids (bottleneck attention); other models take any size.
        **kwargs: ``ByobNet`` arguments (``num_classes``, ``in_chans``, ``global_pool``, ``drop_rate``,
            ``drop_path_rate``, ``output_stride``, ...).

    Input ``(B, in_chans, H, W)``; ``forward_features`` gives ``(B, num_features, ceil(H / 32), ceil(W / 32))``.
    """

    def __init__(
        self,
        cfg: ByoModelCfg,
        halo_pad_mask: bool | None = None,
        halo_recompute: bool | None = None,
        img_size: int | tuple[int, int] | None = None,
        lean_norm_act: bool = True,
        attn_backend: str | None = None,
        **kwargs: Any,
    ) -> None:
        halo_layer = partial(ZooHaloAttn, pad_mask=halo_pad_mask, recompute=halo_recompute, attn_backend=attn_backend)
        super().__init__(_with_zoo_halo(cfg, halo_layer), img_size=img_size, **kwargs)
        if lean_norm_act:
            _lean_norm_act_(self)
        # feature-size-bound layers (bottleneck attention) accept only the size they were built for
        fixed = any(isinstance(m, BottleneckAttn) for m in self.modules())
        self.fixed_input_size: tuple[int, int] | None = None
        if fixed and img_size is not None:
            self.fixed_input_size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)

    def set_halo_pad_mask(self, pad_mask: bool | None) -> None:
        """Set ``pad_mask`` of every halo layer (``None`` auto, ``False`` timm's numerics, ``True`` always mask)."""
        for module in self.modules():
            if isinstance(module, ZooHaloAttn):
                module.pad_mask = pad_mask

    def set_attn_backend(self, backend: str | None) -> None:
        """Route every halo layer through ``zoo.ops.halo_attention(backend=...)``; None: the dispatch decides."""
        for module in self.modules():
            if isinstance(module, ZooHaloAttn):
                module.attn_backend = backend

    def _check_input_size(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` unchanged, after the fixed-size check of the hybrids (none for the other models)."""
        if self.fixed_input_size is None:
            return x
        return _check_fixed_input_size(x, self.fixed_input_size)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, in_chans, H, W) -> (B, num_features, ceil(H / 32), ceil(W / 32))``."""
        x = self._check_input_size(x)
        return super().forward_features(x)

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | list[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
        exclude_final_conv: bool = False,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """timm's ``forward_intermediates``: NCHW maps of 5 levels (stem at stride 2, stages at 4, 8, 16, 32)."""
        x = self._check_input_size(x)
        return super().forward_intermediates(
            x, indices=indices, norm=norm, stop_early=stop_early, output_fmt=output_fmt,
            intermediates_only=intermediates_only, exclude_final_conv=exclude_final_conv,
        )  # fmt: skip


# -------------------------------------------------------------------------------------------- paper family


def _paper_cfg(
    block_size: int,
    halo_size: int,
    value_ratio: float,
    bottleneck_ratio: float,
    depths: tuple[int, int, int, int],
    final_chs: int = 0,
    num_heads: tuple[int, int, int, int] = (4, 8, 8, 8),
) -> ByoModelCfg:
    """The paper's all-attention HaloNet: stage widths 64..512, outputs ``r_b`` x width, values ``r_v`` x width."""
    widths = (64, 128, 256, 512)
    blocks = tuple(
        ByoBlockCfg(
            type=partial(ValueExpandedSelfAttnBlock, value_ratio=value_ratio),
            d=d,
            c=int(round(w * bottleneck_ratio)),
            s=1 if i == 0 else 2,
            gs=0,
            br=1.0 / bottleneck_ratio,  # ByobNet's mid = c * br = w: the attention width is the stage width
            # block kwargs replace the model's (timm's override_kwargs), so they carry b and h too
            self_attn_kwargs=dict(block_size=block_size, halo_size=halo_size, num_heads=heads),
        )
        for i, (w, d, heads) in enumerate(zip(widths, depths, num_heads))
    )
    return ByoModelCfg(
        blocks=blocks,
        stem_chs=64,
        stem_type="7x7",
        stem_pool="maxpool",
        num_features=final_chs,
        self_attn_layer="halo",
        self_attn_kwargs=dict(block_size=block_size, halo_size=halo_size),
    )


_TIMM_CFGS = (
    "halonet26t", "sehalonet33ts", "halonet50ts", "eca_halonext26ts", "haloregnetz_b", "lamhalobotnet50ts",
    "halo2botnet50ts",
)  # fmt: skip

# timm's configs for timm's names, the paper's (second-hand) table for the rest: b, h, r_v, r_b, depths, d_f
model_cfgs: dict[str, ByoModelCfg] = dict(
    halonet_h0=_paper_cfg(8, 3, 1.0, 0.5, (3, 3, 7, 3)),
    halonet_h1=timm_model_cfgs["halonet_h1"],
    halonet_h2=_paper_cfg(8, 3, 1.0, 1.25, (3, 3, 11, 3)),
    halonet_h3=_paper_cfg(10, 3, 1.0, 1.5, (3, 3, 12, 3), 1024),
    halonet_h4=_paper_cfg(12, 2, 1.0, 3.0, (3, 3, 12, 3), 1280),
    halonet_h5=_paper_cfg(14, 2, 2.5, 2.0, (3, 3, 23, 3), 1536),
    halonet_h6=_paper_cfg(8, 4, 3.0, 2.75, (3, 3, 24, 3), 1536),
    halonet_h7=_paper_cfg(10, 3, 4.0, 3.5, (3, 3, 26, 3), 2048),
    **{name: timm_model_cfgs[name] for name in _TIMM_CFGS},
)

# the paper's parameter counts (M), second-hand; the tests hold zoo's within 5% of them
PAPER_PARAMS_M = dict(
    halonet_h0=5.5, halonet_h1=8.1, halonet_h2=9.4, halonet_h3=11.8, halonet_h4=19.1, halonet_h5=30.7,
    halonet_h6=43.4, halonet_h7=67.4,
)  # fmt: skip


# ------------------------------------------------------------------------------------- checkpoints, builder


def checkpoint_filter_fn(state_dict: dict[str, Any], model: HaloNet) -> dict[str, torch.Tensor]:
    """timm's HaloNet checkpoints are zoo's layout already: unwrap training containers, pass keys unchanged.

    Idempotent. Accepts the bare state dict or a checkpoint holding it under ``'state_dict'`` or ``'model'``.
    """
    for key in ("state_dict", "model"):
        if key in state_dict and isinstance(state_dict[key], dict):
            state_dict = state_dict[key]
    return {k.removeprefix("module."): v for k, v in state_dict.items()}


def _create_halonet(variant: str, cfg_variant: str | None = None, pretrained: bool = False, **kwargs: Any) -> HaloNet:
    return build_model_with_cfg(
        HaloNet,
        variant,
        pretrained,
        model_cfg=model_cfgs[cfg_variant or variant],
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(flatten_sequential=True),
        **kwargs,
    )


def _cfg(url: str = "", **kwargs: Any) -> dict[str, Any]:
    return {
        "url": url, "num_classes": 1000, "input_size": (3, 256, 256), "pool_size": (8, 8), "crop_pct": 0.95,
        "interpolation": "bicubic", "mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD,
        "first_conv": "stem.conv1.conv", "classifier": "head.fc", "license": "apache-2.0",
        "paper_ids": "arXiv:2103.12731", "paper_name": FAMILY["title"], **kwargs,
    }  # fmt: skip


def _timm_cfg(arch_tag: str, **kwargs: Any) -> dict[str, Any]:
    """timm's pretrained cfg for ``arch.tag`` (weights, crop, mean/std...) without its ``min_input_size``."""
    arch, tag = arch_tag.split(".")
    cfg = _model_default_cfgs[arch].cfgs[tag].to_dict()
    cfg = {k: v for k, v in cfg.items() if k not in ("architecture", "tag", "min_input_size")}
    if (cfg.get("hf_hub_id") or "").endswith(arch_tag):  # zoo's registry completes 'timm/' itself
        cfg["hf_hub_id"] = "timm/"
    return _cfg(**{**cfg, "paper_ids": "arXiv:2103.12731", **kwargs})


def _paper_res(res: int) -> dict[str, Any]:
    pool = -(-res // 32)  # the convs and strided queries round up
    return _cfg(input_size=(3, res, res), pool_size=(pool, pool), origin_url="https://arxiv.org/abs/2103.12731")


default_cfgs = generate_default_cfgs(
    {
        "halonet_h0.untrained": _paper_res(256),
        "halonet_h1.untrained": _timm_cfg("halonet_h1.untrained"),
        "halonet_h2.untrained": _paper_res(256),
        "halonet_h3.untrained": _paper_res(320),
        "halonet_h4.untrained": _paper_res(384),
        "halonet_h5.untrained": _paper_res(448),
        "halonet_h6.untrained": _paper_res(512),
        "halonet_h7.untrained": _paper_res(600),
        "halonet26t.a1h_in1k": _timm_cfg("halonet26t.a1h_in1k"),
        "sehalonet33ts.ra2_in1k": _timm_cfg("sehalonet33ts.ra2_in1k"),
        "halonet50ts.a1h_in1k": _timm_cfg("halonet50ts.a1h_in1k"),
        "eca_halonext26ts.c1_in1k": _timm_cfg("eca_halonext26ts.c1_in1k"),
        "haloregnetz_b.ra3_in1k": _timm_cfg("haloregnetz_b.ra3_in1k"),
        "lamhalobotnet50ts_256.a1h_in1k": _timm_cfg("lamhalobotnet50ts_256.a1h_in1k"),
        "halo2botnet50ts_256.a1h_in1k": _timm_cfg("halo2botnet50ts_256.a1h_in1k"),
    }
)


# ------------------------------------------------------------------------------------------- registrations


@register_model
def halonet_h0(pretrained: bool = False, **kwargs: Any) -> HaloNet:
    """HaloNet-H0 (paper, second-hand): b=8, h=3, r_v=1, r_b=0.5, depths 3-3-7-3, 256 px. No weights."""
    return _create_halonet("halonet_h0", pretrained=pretrained, **kwargs)


@register_model
def halonet_h1(pretrained: bool = False, **kwargs: Any) -> HaloNet:
    """HaloNet-H1 in timm's layout (b=8, h=3, 8 heads, depths 3-3-10-3, 256 px); loads timm's state dicts."""
    return _create_halonet("halonet_h1", pretrained=pretrained, **kwargs)


@register_model
def halonet_h2(pretrained: bool = False, **kwargs: Any) -> HaloNet:
    """HaloNet-H2 (paper, second-hand): b=8, h=3, r_v=1, r_b=1.25, depths 3-3-11-3, 256 px. No weights."""
    return _create_halonet("halonet_h2", pretrained=pretrained, **kwargs)


@register_model
def halonet_h3(pretrained: bool = False, **kwargs: Any) -> HaloNet:
    """HaloNet-H3 (paper, second-hand): b=10, h=3, r_v=1, r_b=1.5, depths 3-3-12-3, d_f=1024, 320 px."""
    return _create_halonet("halonet_h3", pretrained=pretrained, **kwargs)


@register_model
def halonet_h4(pretrained: bool = False, **kwargs: Any) -> HaloNet:
    """HaloNet-H4 (paper, second-hand): b=12, h=2, r_v=1, r_b=3, depths 3-3-12-3, d_f=1280, 384 px."""
    return _create_halonet("halonet_h4", pretrained=pretrained, **kwargs)


@register_model
def halonet_h5(pretrained: bool = False, **kwargs: Any) -> HaloNet:
    """HaloNet-H5 (paper, second-hand): b=14, h=2, r_v=2.5, r_b=2, depths 3-3-23-3, d_f=1536, 448 px."""
    return _create_halonet("halonet_h5", pretrained=pretrained, **kwargs)


@register_model
def halonet_h6(pretrained: bool = False, **kwargs: Any) -> HaloNet:
    """HaloNet-H6 (paper, second-hand): b=8, h=4, r_v=3, r_b=2.75, depths 3-3-24-3, d_f=1536, 512 px."""
    return _create_halonet("halonet_h6", pretrained=pretrained, **kwargs)


@register_model
def halonet_h7(pretrained: bool = False, **kwargs: Any) -> HaloNet:
    """HaloNet-H7 (paper, second-hand): b=10, h=3, r_v=4, r_b=3.5, depths 3-3-26-3, d_f=2048, 600 px."""
    return _create_halonet("halonet_h7", pretrained=pretrained, **kwargs)


@register_model
def halonet26t(pretrained: bool = False, **kwargs: Any) -> HaloNet:
    """timm's HaloNet on ResNet26-T: halo attention (b=8, h=2) in the last two stages."""
    return _create_halonet("halonet26t", pretrained=pretrained, **kwargs)


@register_model
def sehalonet33ts(pretrained: bool = False, **kwargs: Any) -> HaloNet:
    """timm's SE-HaloNet-33-TS: SE convs, SiLU, halo (b=8, h=3) in stages 2-4, final 1x1 conv 1280."""
    return _create_halonet("sehalonet33ts", pretrained=pretrained, **kwargs)


@register_model
def halonet50ts(pretrained: bool = False, **kwargs: Any) -> HaloNet:
    """timm's HaloNet on ResNet50-T, SiLU: halo (b=8, h=3) in every 2nd block of stages 3-4, last of stage 2."""
    return _create_halonet("halonet50ts", pretrained=pretrained, **kwargs)


@register_model
def eca_halonext26ts(pretrained: bool = False, **kwargs: Any) -> HaloNet:
    """timm's ECA-HaloNeXt-26-TS: grouped convs (gs=16), ECA, SiLU, halo (b=8, h=2, dim_head 16)."""
    return _create_halonet("eca_halonext26ts", pretrained=pretrained, **kwargs)


@register_model
def haloregnetz_b(pretrained: bool = False, **kwargs: Any) -> HaloNet:
    """timm's Halo-RegNetZ-B: inverted bottlenecks, SE, halo (b=7, h=2, qk_ratio 0.33) in stages 3-4; 224 px."""
    return _create_halonet("haloregnetz_b", pretrained=pretrained, **kwargs)


@register_model
def lamhalobotnet50ts_256(pretrained: bool = False, **kwargs: Any) -> HaloNet:
    """timm's Lambda + Halo + BoT hybrid on ResNet50-T; fixed 256 px (stage-4 bottleneck attention)."""
    return _create_halonet("lamhalobotnet50ts_256", "lamhalobotnet50ts", pretrained=pretrained, **kwargs)


@register_model
def halo2botnet50ts_256(pretrained: bool = False, **kwargs: Any) -> HaloNet:
    """timm's Halo + Halo + BoT hybrid on ResNet50-T; fixed 256 px (stage-4 bottleneck attention)."""
    return _create_halonet("halo2botnet50ts_256", "halo2botnet50ts", pretrained=pretrained, **kwargs)
