"""MEDUSA: Multi-scale Encoder-Decoder Self-Attention (Aboutalebi et al., arXiv:2110.06063) -- a reconstruction.

**Architecture reconstructed from the abstract and the released I/O contract; not numerically equivalent to
COVID-Net CXR-3; no official weights.** No code that builds MEDUSA was ever released (the CXR-3 graph was
made with the proprietary GenSynth tool) and the paper's method section was not available; everything
below that is not in "Known" is an assumption (each is listed below and on the model card).

Known (paper abstract and the released COVID-Net CXR-3 scripts):

* one high-capacity encoder-decoder attention network (the *body*) from which several attention *heads*
  branch off, each head feeding a different scale of the main classification network;
* the body sees its own copy of the image: grayscale, resized to 256x256, standardised per image
  (subtract the image's own mean, divide by its own std); the main network sees 480x480 RGB in [0, 1];
* output: 2-way softmax (COVID-19 negative / positive) for CXR-3.

Assumptions (all configurable through :class:`Medusa`'s arguments):

1. **Body** = a U-Net: double 3x3 conv-BN-ReLU per level, ``len(body_widths) - 1`` max-pool downsamplings
   (4 by default), bilinear-upsampling decoder with skip concatenation, output a full-resolution map
   ``(B, body_widths[0], attn_size, attn_size)``. One global multi-head self-attention block (pre-norm,
   SDPA, depthwise-conv position encoding) sits at the bottleneck so every head sees image-wide context
   (``body_attn_heads=0`` removes it).
2. **Heads**: one per gated backbone stage (4, at strides 4/8/16/32 for ResNets). Head i = 3x3 conv-BN-ReLU
   with stride 2 on the body output (stride 2 only to save compute) -> resize to the stage's (H_i, W_i)
   (area pooling when shrinking, bilinear when enlarging) -> 1x1 conv to ``gate_chs`` channels (1 by
   default: a spatial map; ``gate_chs='stage'`` gives one map per stage channel) -> sigmoid -> A_i.
3. **Fusion**: ``F_i <- F_i * (1 + A_i)`` (``fusion='residual'``, default: the backbone path is never
   switched off, safer to train from a pretrained backbone) or ``F_i <- F_i * A_i`` (``fusion='multiply'``).
   The gated F_i is what stage i+1 receives, so attention compounds across scales; it is the output of module
   ``fusions.i``, which ``feature_info`` names (so FX- and hook-based feature extraction return it).
4. **Backbone**: timm's ``resnet50`` by default (the released CXR-3 uses a COVID-Net design; the backbone
   for the RICORD / RSNA results is unverified). Any zoo or timm model whose ``features_only`` wrapper is a
   ``FeatureListNet`` / ``FeatureDictNet`` (module-sequence extractors: ResNets, ConvNeXts, ByobNets
   including zoo's HaloNets...) can be passed by name; the gated levels are picked with ``backbone_indices``.
   Other extractors (timm's ``EfficientNetFeatures``, ``FeatureGetterNet`` ViTs) raise ``ValueError``.
5. The body is randomly initialised (its "semantic graph" naming hints at segmentation pretraining; unverified).
6. Input: ``forward(x)`` derives the body input inside the model (channel mean -> resize to ``attn_size``
   -> per-image z-score), so one tensor suffices (and timm's tooling works); ``forward(x, x_attn)``
   reproduces the two-input CXR-3 contract with a caller-prepared ``(B, 1, 256, 256)`` body input.
   CXR-3 does not augment the body input; with the single-input form both views are augmented together.
7. Head: global average pool -> dropout -> linear (2 classes by default).

Attention maps A_i are exposed by :meth:`Medusa.attention_maps` (for visualisation / Grad-CAM-like use).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from timm.layers import ClassifierHead, register_notrace_function, trunc_normal_
from timm.models import build_model_with_cfg, generate_default_cfgs
from timm.models._features import FeatureDictNet, feature_take_indices
from torch import nn
from torch.utils.checkpoint import checkpoint

from .._registry import register_model

__all__ = ["Medusa", "MedusaBody", "AttentionHead", "FAMILY", "per_image_standardize"]

FAMILY = dict(
    name="MEDUSA",
    title="MEDUSA: Multi-scale Encoder-Decoder Self-Attention Deep Neural Network Architecture for Medical "
    "Image Analysis",
    paper_ids="arXiv:2110.06063",
    origin_url="https://github.com/lindawangg/COVID-Net",
    implementation="zoo reconstruction (zoo.models.medusa): architecture reconstructed from the abstract and the "
    "released I/O contract; not numerically equivalent to COVID-Net CXR-3; no official weights",
    citation="""@article{aboutalebi2022medusa,
  title={MEDUSA: Multi-Scale Encoder-Decoder Self-Attention Deep Neural Network Architecture for Medical Image
         Analysis},
  author={Aboutalebi, Hossein and Pavlova, Maya and Gunraj, Hayden and Shafiee, Mohammad Javad and
          Sabri, Ali and Alaref, Amer and Wong, Alexander},
  journal={Frontiers in Medicine},
  volume={8},
  pages={821120},
  year={2022}
}""",
    reported_top1={},  # no ImageNet numbers: MEDUSA is a chest X-ray model
    reported_source="COVID-Net README / docs/models.md (CXR-3 on COVIDx8B test, 400 images): accuracy 98.3 %, "
    "sensitivity negative 99.0 % / positive 97.5 %, PPV negative 97.5 % / positive 99.0 %; 29.2 M params, "
    "29.1 GMACs at 480 px (COVID-Net main network, not this reconstruction's ResNet)",
    notes="Architecture reconstructed from the abstract and the released I/O contract; not numerically equivalent "
    "to COVID-Net CXR-3; no official weights. Body layers, head count, attachment stages, fusion and gating "
    "are assumptions (see the module docstring). The released CXR-3 main network is a COVID-Net design, not ResNet-50. "
    "RICORD / RSNA Pneumonia results and tasks unverified.",
)


def per_image_standardize(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Subtract each image's own mean and divide by its own (population) std, as CXR-3's MEDUSA input.

    Args:
        x: ``(B, C, H, W)``.
    Returns:
        ``(B, C, H, W)``, zero mean and unit std per sample (over C, H, W).
    """
    flat = x.flatten(1)
    mean = flat.mean(1).view(-1, 1, 1, 1)
    std = flat.std(1, correction=0).view(-1, 1, 1, 1)
    return (x - mean) / std.clamp_min(eps)


@register_notrace_function  # a leaf for timm's FX feature extraction: it branches on sizes, Proxies when traced
@torch.fx.wrap  # ... and for any other torch.fx trace
def _resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Area pooling when shrinking (no aliasing), bilinear otherwise. ``(B, C, h, w) -> (B, C, *size)``."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    if x.shape[-2] >= size[0] and x.shape[-1] >= size[1]:
        return F.adaptive_avg_pool2d(x, size)
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


@register_notrace_function  # a leaf for torch.fx: whether x_attn is None is known only when the graph runs ...
@torch.fx.wrap  # ... (tracing turns the optional argument into a Proxy placeholder, never None)
def _body_input(x: torch.Tensor, x_attn: torch.Tensor | None, attn_size: tuple[int, int]) -> torch.Tensor:
    """``x_attn``, or when it is None the body input derived from ``x``: channel mean -> bilinear resize to
    ``attn_size`` -> per-image z-score. ``(B, C, H, W)`` -> ``(B, 1, *attn_size)``."""
    if x_attn is not None:
        return x_attn
    gray = F.interpolate(x.mean(1, keepdim=True), size=attn_size, mode="bilinear", align_corners=False)
    return per_image_standardize(gray)


class ConvBnAct(nn.Sequential):
    """3x3 (or k x k) conv -> BatchNorm -> ReLU."""

    def __init__(self, in_chs: int, out_chs: int, kernel_size: int = 3, stride: int = 1) -> None:
        super().__init__(
            nn.Conv2d(in_chs, out_chs, kernel_size, stride, kernel_size // 2, bias=False),
            nn.BatchNorm2d(out_chs),
            nn.ReLU(),
        )


class DoubleConv(nn.Sequential):
    """Two ConvBnAct, the U-Net level block."""

    def __init__(self, in_chs: int, out_chs: int) -> None:
        super().__init__(ConvBnAct(in_chs, out_chs), ConvBnAct(out_chs, out_chs))


class BottleneckSelfAttention(nn.Module):
    """Global multi-head self-attention over the U-Net bottleneck (assumption 1). ``(B, C, h, w)`` -> same."""

    def __init__(self, dim: int, num_heads: int = 8, mlp_ratio: float = 2.0) -> None:
        super().__init__()
        if num_heads < 1 or dim % num_heads:  # a ValueError, not an assert: asserts vanish under python -O
            raise ValueError(
                f"MEDUSA body: bottleneck width body_widths[-1]={dim} is not divisible by body_attn_heads="
                f"{num_heads}; pass a divisor of {dim} (or body_attn_heads=0 for no attention)"
            )
        self.num_heads = num_heads
        self.pos = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)  # conditional position encoding
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        x = x + self.pos(x)
        t = x.flatten(2).transpose(1, 2)  # (B, N, C)
        qkv = self.qkv(self.norm1(t)).reshape(B, H * W, 3, self.num_heads, C // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, heads, N, head_dim)
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, H * W, C)
        t = t + self.proj(a)
        t = t + self.mlp(self.norm2(t))
        return t.transpose(1, 2).reshape(B, C, H, W)


class MedusaBody(nn.Module):
    """The single shared encoder-decoder attention body (a U-Net, assumption 1).

    ``(B, in_chs, h, w)`` (z-scored grayscale, 256x256 by default) -> ``(B, widths[0], h, w)``.
    """

    def __init__(self, in_chs: int = 1, widths: Sequence[int] = (32, 64, 128, 256, 512), attn_heads: int = 8) -> None:
        super().__init__()
        widths = tuple(widths)
        self.out_chs = widths[0]
        self.stem = DoubleConv(in_chs, widths[0])
        self.down = nn.ModuleList([DoubleConv(widths[i], widths[i + 1]) for i in range(len(widths) - 1)])
        self.attn = BottleneckSelfAttention(widths[-1], attn_heads) if attn_heads > 0 else nn.Identity()
        self.up = nn.ModuleList(
            [DoubleConv(widths[i + 1] + widths[i], widths[i]) for i in reversed(range(len(widths) - 1))]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = [self.stem(x)]
        for block in self.down:
            skips.append(block(F.max_pool2d(skips[-1], 2)))
        x = self.attn(skips.pop())
        for block in self.up:
            skip = skips.pop()
            x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            x = block(torch.cat([x, skip], dim=1))
        return x


class AttentionHead(nn.Module):
    """One attention head (assumption 2): body output -> gate A_i in (0, 1) at a backbone stage's size.

    ``(B, in_chs, h, w)`` + target ``(H_i, W_i)`` -> ``(B, out_chs, H_i, W_i)``.
    """

    def __init__(self, in_chs: int, out_chs: int = 1, hidden_chs: int | None = None) -> None:
        super().__init__()
        hidden_chs = hidden_chs or in_chs
        self.conv = ConvBnAct(in_chs, hidden_chs, 3, stride=2)
        self.gate = nn.Conv2d(hidden_chs, out_chs, 1)

    def forward(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        return torch.sigmoid(self.gate(_resize(self.conv(x), size)))


class GateFusion(nn.Module):
    """Fusion of a stage map with its gate (assumption 3): ``F * (1 + A)`` (residual) or ``F * A`` (multiply).

    A module (without parameters) so that the gated map -- a ``feature_info`` level -- is the output of a named
    module, which hook- and FX-based feature extraction return. ``(B, C, H, W)``, ``(B, 1 or C, H, W)`` -> ``(B, C,
    H, W)``.
    """

    def __init__(self, fusion: str = "residual") -> None:
        super().__init__()
        self.residual = fusion == "residual"

    def forward(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        return x * (1.0 + gate) if self.residual else x * gate


def _create_backbone(name: str, indices: Sequence[int], in_chans: int, pretrained: bool, **kwargs: Any) -> nn.Module:
    """A ``features_only`` module-sequence extractor of any zoo (first) or timm model."""
    from .._factory import create_model  # late: zoo.models is imported while zoo is

    backbone = create_model(
        name, pretrained=pretrained, features_only=True, out_indices=tuple(indices), in_chans=in_chans, **kwargs
    )
    if not isinstance(backbone, FeatureDictNet):  # FeatureListNet subclasses it
        raise ValueError(
            f"MEDUSA gates backbone stages in sequence and needs a module-sequence features_only extractor "
            f"(FeatureListNet / FeatureDictNet); {name!r} gives {type(backbone).__name__}"
        )
    return backbone


class Medusa(nn.Module):
    """MEDUSA reconstruction: one shared attention body, one head per backbone stage (see module docstring).

    Args:
        backbone: zoo or timm model name, built with ``features_only=True``.
        backbone_indices: backbone feature levels to gate (one head each); their outputs are this model's
            ``feature_info`` levels.
        num_classes: classifier outputs (2: COVID-19 negative / positive, as CXR-3).
        in_chans: channels of the main input.
        global_pool: classifier pooling.
        drop_rate: dropout before the classifier.
        drop_path_rate: stochastic depth of the backbone (passed to it when non-zero, as timm's
            ``create_model(..., drop_path_rate=)``).
        attn_size: side of the body input (256 in CXR-3).
        body_widths: U-Net widths per level (first = body output channels).
        body_attn_heads: heads of the bottleneck self-attention (0: none).
        gate_chs: channels of each gate, ``1`` (spatial map) or ``'stage'`` (one per stage channel).
        fusion: ``'residual'`` (F * (1 + A)) or ``'multiply'`` (F * A).
        backbone_pretrained: load the backbone's own pretrained weights (network access; off by default).
        backbone_kwargs: extra kwargs for the backbone.
        device, dtype: where and in which dtype to build the parameters (``device="meta"``: shapes only).
    """

    def __init__(
        self,
        backbone: str = "resnet50",
        backbone_indices: Sequence[int] = (1, 2, 3, 4),
        num_classes: int = 2,
        in_chans: int = 3,
        global_pool: str = "avg",
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        attn_size: int | tuple[int, int] = 256,
        body_widths: Sequence[int] = (32, 64, 128, 256, 512),
        body_attn_heads: int = 8,
        gate_chs: int | str = 1,
        fusion: str = "residual",
        backbone_pretrained: bool = False,
        backbone_kwargs: dict[str, Any] | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if fusion not in ("residual", "multiply"):
            raise ValueError(f"fusion must be 'residual' or 'multiply', got {fusion!r}")
        sizes = (attn_size,) if isinstance(attn_size, int) else tuple(attn_size)
        if not body_widths or min(body_widths) < 1 or min(sizes) < 1 or body_attn_heads < 0:
            raise ValueError(
                f"MEDUSA: body_widths={tuple(body_widths)}, attn_size={attn_size}, body_attn_heads="
                f"{body_attn_heads}: widths and sizes must be >= 1 and heads >= 0"
            )
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.drop_rate = drop_rate
        self.fusion = fusion
        self.attn_size = (attn_size, attn_size) if isinstance(attn_size, int) else tuple(attn_size)
        self.grad_checkpointing = False

        backbone_kwargs = dict(backbone_kwargs or {})
        if drop_path_rate:  # only when asked: backbones without stochastic depth do not take the keyword
            backbone_kwargs.setdefault("drop_path_rate", drop_path_rate)
        if device is not None:
            backbone_kwargs.setdefault("device", device)
        self.backbone = _create_backbone(backbone, backbone_indices, in_chans, backbone_pretrained, **backbone_kwargs)
        bb_info = self.backbone.feature_info
        chs, reductions = bb_info.channels(), bb_info.reduction()
        # the stage each backbone module belongs to: modules up to and including return layer i -> stage i
        self._stage_of: dict[str, int] = {}
        stage = 0
        for name, _ in self.backbone.items():
            self._stage_of[name] = stage
            if name in self.backbone.return_layers:
                stage += 1
        # a level is the gated map, the output of fusions.i (not of the backbone module it gates)
        self.feature_info = [
            dict(num_chs=c, reduction=r, module=f"fusions.{i}") for i, (c, r) in enumerate(zip(chs, reductions))
        ]
        self.num_features = self.head_hidden_size = chs[-1]
        with torch.device(device) if device is not None else contextlib.nullcontext():
            self.body = MedusaBody(1, body_widths, body_attn_heads)
            self.heads = nn.ModuleList(
                [AttentionHead(self.body.out_chs, c if gate_chs == "stage" else int(gate_chs)) for c in chs]
            )
            self.fusions = nn.ModuleList([GateFusion(fusion) for _ in chs])
            self.head = ClassifierHead(self.num_features, num_classes, pool_type=global_pool, drop_rate=drop_rate)
            self._init_weights()
        if dtype is not None:
            self.to(dtype=dtype)

    def _init_weights(self) -> None:
        for m in [*self.body.modules(), *self.heads.modules(), *self.head.modules()]:
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    # ---- timm contract -------------------------------------------------------------------------------------
    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """Body and backbone stem first, then backbone stage i with head i."""
        stem = [n for n, s in self._stage_of.items() if s == 0 and n not in self.backbone.return_layers]
        stem_re = "|".join(["body"] + [f"backbone\\.{n}" for n in stem])
        blocks = []
        for i in range(len(self.heads)):
            names = "|".join(n for n, s in self._stage_of.items() if s == i and n not in stem)
            blocks.append((rf"^(?:backbone\.(?:{names})|heads\.{i})\.", (i,)))
        return dict(stem=rf"^(?:{stem_re})\.", blocks=blocks)

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return set()

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head.fc

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        self.num_classes = num_classes
        self.head.reset(num_classes, global_pool)

    # ---- MEDUSA ----------------------------------------------------------------------------------------------
    def attention_input(self, x: torch.Tensor) -> torch.Tensor:
        """The body's input derived from the main input: channel mean -> resize -> per-image z-score.

        ``(B, C, H, W)`` -> ``(B, 1, *attn_size)``.
        """
        return _body_input(x, None, self.attn_size)

    def _run(self, fn: nn.Module, *args: Any) -> Any:
        if self.grad_checkpointing and not torch.jit.is_scripting() and torch.is_grad_enabled():
            return checkpoint(fn, *args, use_reentrant=False)
        return fn(*args)

    def _stages(
        self, x: torch.Tensor, x_attn: torch.Tensor | None, stop: int | None = None
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Run the gated backbone. Returns (gated stage outputs, gates), each with one ``(B, C_i, H_i, W_i)``
        (gates: ``(B, 1 or C_i, H_i, W_i)``) per stage up to ``stop`` (inclusive; all when None)."""
        body = self._run(self.body, _body_input(x, x_attn, self.attn_size))
        feats, gates = [], []
        for name, module in self.backbone.items():
            inplace = getattr(module, "inplace", False) is True
            x = module(x) if inplace else self._run(module, x)
            if name in self.backbone.return_layers:
                i = len(feats)
                a = self._run(self.heads[i], body, (x.shape[-2], x.shape[-1]))
                x = self.fusions[i](x, a)
                feats.append(x)
                gates.append(a)
                if stop is not None and i >= stop:
                    break
        return feats, gates

    def attention_maps(self, x: torch.Tensor, x_attn: torch.Tensor | None = None) -> list[torch.Tensor]:
        """The gates A_i in (0, 1), one ``(B, gate_chs, H_i, W_i)`` per gated stage (for visualisation)."""
        return self._stages(x, x_attn)[1]

    def forward_features(self, x: torch.Tensor, x_attn: torch.Tensor | None = None) -> torch.Tensor:
        """``(B, in_chans, H, W)`` [+ ``(B, 1, h, w)`` body input] -> ``(B, num_features, H/32, W/32)`` (ResNet)."""
        return self._stages(x, x_attn)[0][-1]

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """``(B, num_features, h, w)`` -> ``(B, num_classes)`` (``(B, num_features)`` with pre_logits)."""
        return self.head(x, pre_logits=pre_logits)

    def forward(self, x: torch.Tensor, x_attn: torch.Tensor | None = None) -> torch.Tensor:
        """``(B, in_chans, H, W)`` [+ ``(B, 1, h, w)`` z-scored body input] -> logits ``(B, num_classes)``."""
        return self.forward_head(self.forward_features(x, x_attn))

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | list[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
        x_attn: torch.Tensor | None = None,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """timm's forward_intermediates: gated stage outputs ``(B, C_i, H_i, W_i)`` at ``indices``."""
        assert output_fmt == "NCHW", "Output format must be NCHW."
        take_indices, max_index = feature_take_indices(len(self.heads), indices)
        feats, _ = self._stages(x, x_attn, stop=max_index if (stop_early or intermediates_only) else None)
        intermediates = [feats[i] for i in take_indices]
        if intermediates_only:
            return intermediates
        return feats[-1], intermediates

    def prune_intermediate_layers(
        self, indices: int | list[int] = 1, prune_norm: bool = False, prune_head: bool = True
    ) -> list[int]:
        """Drop backbone stages and heads after the last index needed; returns the take-indices."""
        take_indices, max_index = feature_take_indices(len(self.heads), indices)
        for name in [n for n, s in self._stage_of.items() if s > max_index]:
            del self.backbone[name]
            del self._stage_of[name]
            self.backbone.return_layers.pop(name, None)
        self.heads = self.heads[: max_index + 1]
        self.fusions = self.fusions[: max_index + 1]
        if prune_head:
            self.reset_classifier(0, "")
        return take_indices


def _cfg(**kwargs: Any) -> dict[str, Any]:
    return {
        "url": "", "num_classes": 2, "input_size": (3, 480, 480), "pool_size": (15, 15), "crop_pct": 1.0,
        "interpolation": "bilinear", "mean": (0.0, 0.0, 0.0), "std": (1.0, 1.0, 1.0),  # CXR-3: [0, 1] input
        "first_conv": "backbone.conv1", "classifier": "head.fc", "license": "apache-2.0",
        "paper_ids": "arXiv:2110.06063", "paper_name": FAMILY["title"],
        "origin_url": "https://arxiv.org/abs/2110.06063", "notes": (FAMILY["notes"],), **kwargs,
    }  # fmt: skip


default_cfgs = generate_default_cfgs(
    {
        "medusa_resnet50.untrained": _cfg(),
        "medusa_resnet18.untrained": _cfg(),
    }
)


def _create_medusa(variant: str, pretrained: bool = False, **kwargs: Any) -> Medusa:
    return build_model_with_cfg(
        Medusa,
        variant,
        pretrained,
        feature_cfg=dict(feature_cls="getter", out_indices=(0, 1, 2, 3)),
        **kwargs,
    )


@register_model
def medusa_resnet50(pretrained: bool = False, **kwargs: Any) -> Medusa:
    """MEDUSA (reconstruction) on ResNet-50: U-Net body 32-512 + bottleneck MHSA, 4 heads, 480 px. No weights."""
    return _create_medusa("medusa_resnet50", pretrained, **dict(dict(backbone="resnet50"), **kwargs))


@register_model
def medusa_resnet18(pretrained: bool = False, **kwargs: Any) -> Medusa:
    """Small MEDUSA (reconstruction) on ResNet-18: U-Net body 16-256 + bottleneck MHSA, 4 heads. No weights."""
    model_args = dict(backbone="resnet18", body_widths=(16, 32, 64, 128, 256), body_attn_heads=4)
    return _create_medusa("medusa_resnet18", pretrained, **dict(model_args, **kwargs))
