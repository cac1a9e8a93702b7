"""Probing heads on frozen tokens: Efficient Probing (EP) and its peers.

Contract (registry kind ``probe``): built with ``embed_dim=`` and ``num_classes=`` (plus the head's own
options); ``forward(tokens)`` maps frozen tokens ``(B, N, D)`` to logits ``(B, num_classes)``. Every
probe is ``pool -> BatchNorm1d(affine=False, eps=1e-6) -> Linear`` (the MAE linear-probe convention),
so probes differ only in their pooling. ``forward_pool(tokens)`` gives the pooled ``(B, width)``
features and ``pool_parameters()`` counts the pooling alone (without the shared classifier).

``num_prefix_tokens`` says how many leading tokens are not patch tokens ([CLS], registers): the
class-token linear probe reads token 0, the others drop the prefix unless ``use_prefix_tokens=True``
(EP's ``ep_all`` variant, advised for encoders trained on their [CLS] token).

Entries: ``efficient_probe`` (EP, Psomas et al., arXiv:2506.10178, as ``poolings/ep.py`` of
billpsomas/efficient-probing defines it), ``linear_probe_cls``, ``linear_probe_avg`` and the peers EP's paper
compares with, each as the EP repository builds it for its ``--cls_features`` flag: ``attentive_probe`` (the
``siglip`` peer: SigLIP's MAP head with 8 heads and no LayerNorm), ``vjepa_probe`` (V-JEPA's attentive pooler),
``aim_probe`` (AIM's attentive probe: BN on tokens, W_k / W_v only), ``abmil_probe`` (ABMIL-style pooling of
"Beyond [cls]", the ``abmilp`` defaults) and ``simpool_probe`` (SimPool). Two more: ``map_probe`` (timm's MAP
head as timm's ViTs build it for ``global_pool='map'``: heads of 64 channels, LayerNorm before the MLP) and
``mha_probe`` (bare multi-head cross-attention with q/k/v/o, no MLP: V-JEPA's ``complete_block=False``).
Each default reproduces the code named in ``FAMILY['references']``; kept differences are keywords listed in
``FAMILY['deviations']``.

Sizes of the pooling alone at D = 768 (the classifier adds (D + 1) C for every probe; 769,000 at C = 1000):
EP (Q = 32) 614,400; AIM 1,180,416; SimPool 1,181,184; bare q/k/v/o 2,363,136; ABMIL 2,951,425;
SigLIP MAP (``attentive_probe``) 7,085,568; timm MAP 7,087,104; V-JEPA 7,088,640 (equal to the authors' modules).

The issue's benchmark target (EP at most 1/3 of the trainable parameters of "the multi-head attentive probe
with full q/k/v/o projections") is measured against ``attentive_probe``; counted as the EP paper counts
trainable parameters (whole probe, classifier included: EP = 1,383,400) the ratio is 0.176, pooling alone
0.087. The smaller peers miss it on the whole-probe count: ``mha_probe`` 0.44 (pooling 0.26), ``aim_probe``
0.71 (pooling 0.52). ``benchmarks/probing_bench.py`` prints both countings for every peer.

Authors' checkpoints load as they are saved (``checkpoint_filter_fn``): the probe head alone (``model.head`` of
the EP repository, ``Sequential(pool, BatchNorm1d, Linear)``: keys ``0.*``, ``1.*``, ``2.*``, as its probing runs
and ``tools/export_ep_heads.py`` write it) or a whole EP-repo model (backbone + ``head.*``; the backbone's keys
are dropped), through ``zoo.create_model(name, embed_dim=..., num_classes=..., checkpoint_path=F)`` or
``zoo.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=F), ...)``; zoo's own layout (a
``zoo probe`` checkpoint) passes unchanged. The authors publish no trained probe weights. Their raw run files
(``checkpoint-*.pth``) also pickle the run's ``args``, whose ``--data_path`` is a ``pathlib.Path``: zoo's
weights-only reader refuses those (``UnsafeFileError``); load ``tools/export_ep_heads.py``'s ``ep_head.pth`` or
re-save ``{'model': ckpt['model']}``. Head counts (``--num_heads``) and ``_all`` (``use_prefix_tokens=True``) are
not in the weights: pass them as the run was made.
"""

from __future__ import annotations

import re
from functools import partial
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import Attention, AttentionPoolLatent, Mlp
from timm.models import PretrainedCfg, generate_default_cfgs

from .._registry import register_model

__all__ = [
    "FAMILY",
    "Probe",
    "EfficientPooling",
    "ClassTokenPooling",
    "MeanPooling",
    "AttentivePooling",
    "MAPPooling",
    "AIMPooling",
    "ABMILPooling",
    "SimPooling",
    "checkpoint_filter_fn",
    "efficient_probe_param_count",
]

_EP_REF = "billpsomas/efficient-probing@b8f4fb84"


def _parity(measured: str) -> str:
    return (
        f"parity 1e-5 on the logits (eval, float32: the authors' head vs zoo's with the same weights loaded through "
        f"checkpoint_filter_fn, D=768, N=196, C=1000; measured max abs difference {measured})"
    )


FAMILY = dict(
    name="Efficient Probing",
    title="Attention, Please! Revisiting Attentive Probing Through the Lens of Efficiency",
    paper_ids="arXiv:2506.10178",
    origin_url="https://github.com/billpsomas/efficient-probing",
    implementation="zoo (`zoo.heads.probing`), written from the paper and the EP repository's `poolings/`; "
    "authors' head checkpoints load unchanged",
    citation="""@inproceedings{psomas2026attention,
  title={Attention, Please! Revisiting Attentive Probing Through the Lens of Efficiency},
  author={Psomas, Bill and Christopoulos, Dionysis and Baltzi, Eirini and Kakogeorgiou, Ioannis and
          Aravanis, Tilemachos and Komodakis, Nikos and Karantzalos, Konstantinos and Avrithis, Yannis
          and Tolias, Giorgos},
  booktitle={ICLR},
  year={2026}
}""",
    reported_top1={},
    reported_source=(
        "billpsomas/efficient-probing results.csv (ImageNet-1k best-epoch top-1, Q=32): MAE ViT-B/16 "
        "LP 67.78 / EP 75.46; MAE ViT-L/16 LP 76.01 / EP 79.52. Heads carry no weights of their own."
    ),
    notes=(
        "Probing heads on frozen tokens (B, N, D) -> logits (B, C); trained by `zoo probe`. EP learns Q "
        "queries in token space, keeps one bias-free value projection split into Q channel slices and "
        "concatenates the per-query outputs (the README's 'averaged, identity values' description matches "
        "neither the code nor the figure; zoo follows the code). Peers as the EP repository builds them for "
        "its comparison: linear probes on [CLS] and on mean tokens, SigLIP's MAP head (`siglip`), V-JEPA's "
        "pooler, AIM's probe (W_k / W_v only), ABMIL-style pooling and SimPool; also timm's MAP head and bare "
        "q/k/v/o cross-attention. The authors publish no trained probe checkpoints (checked at b8f4fb84: the "
        "README and results.csv link no head, and the heads `tools/export_ep_heads.py` writes are not "
        "online), so every tag is `.untrained`; a head trained with their code loads as saved "
        "(`checkpoint_path=` or `pretrained_cfg_overlay=dict(file=...)`, see `checkpoint_filter_fn`)."
    ),
    references={
        "efficient_probe": f"{_EP_REF}, poolings/ep.py `EfficientProbing` in probe_heads.py's head "
        "(`--cls_features ep`: pool -> BatchNorm1d(affine=False, eps=1e-6) -> Linear(D / d_out, C)); "
        + _parity("3.0e-7 at Q=32; 4.6e-7 at D=192, Q=8, d_out=2; 2.1e-7 from a whole EP-repo ViT checkpoint")
        + "; 1,383,400 trainable parameters at D=768, C=1000, as logs/mae_base/ep.txt",
        "linear_probe_cls": f"{_EP_REF}, probe_heads.py's plain linear probe (`--cls_features cls`: "
        "BatchNorm1d(affine=False, eps=1e-6) -> Linear on [CLS]); " + _parity("0"),
        "linear_probe_avg": f"{_EP_REF}, probe_heads.py's plain linear probe on the mean of the patch tokens "
        "(`--cls_features pos`); " + _parity("0"),
        "attentive_probe": f"{_EP_REF}, poolings/clip/attention_pool.py `AttentionPoolLatent(in_features=D)` "
        "(`--cls_features siglip`: 8 heads, q/kv/proj with bias, MLP ratio 4, no LayerNorm), built on timm's "
        "AttentionPoolLatent; " + _parity("0"),
        "map_probe": "timm 1.0.31, timm/layers/attention_pool.py `AttentionPoolLatent` as "
        "timm/models/vision_transformer.py builds it for global_pool='map' (heads of 64 channels, "
        "LayerNorm(eps=1e-6) before the MLP); reused, not rewritten",
        "vjepa_probe": f"{_EP_REF}, poolings/jepa/attentive_pooler.py `AttentivePooler` (`--cls_features jepa`; "
        "facebookresearch/jepa's module, whose evals/image_classification_frozen/eval.py builds it with "
        "num_heads = the encoder's: 64-channel heads for ViTs); " + _parity("1.4e-6 on logits up to 4.2, 16 heads"),
        "mha_probe": f"{_EP_REF}, poolings/jepa/attentive_pooler.py `AttentivePooler(complete_block=False)` "
        "(V-JEPA's bare CrossAttention: q/kv/proj with bias; no EP flag builds it); " + _parity("2.7e-7, 16 heads"),
        "aim_probe": f"{_EP_REF}, poolings/aim.py `AttentionPoolingClassifier` (`--cls_features aim`; apple/ml-aim's "
        "module); " + _parity("3.6e-7, 16 heads"),
        "abmil_probe": f"{_EP_REF}, poolings/abmilp.py `ABMILPHead` with main_linprobe.py's defaults "
        "(`--cls_features abmilp`: abmilp_sa='both', tanh, depth 2, no positional conditioning, patch tokens "
        "only; models_vit.Attention(D, num_heads=1): qkv without bias); "
        + _parity("2.7e-7; 2.1e-7 from a whole EP-repo ViT checkpoint"),
        "simpool_probe": f"{_EP_REF}, poolings/simpool.py `SimPool(num_heads=1, qkv_bias=False, gamma=None)` "
        "(`--cls_features simpool`; the forward of billpsomas/simpool's sp.py: query W_q GAP(x) of the raw tokens, "
        "keys W_k LN(x), values LN(x)); " + _parity("0"),
    },
    deviations={
        "vjepa_probe": {
            "num_heads": "default: heads of 64 channels (V-JEPA's own evaluation: the encoder's heads); EP's "
            "`--cls_features jepa` runs pass --num_heads (default 16): pass num_heads=16 for their checkpoints",
        },
        "mha_probe": {
            "num_heads": "default: heads of 64 channels, as vjepa_probe (V-JEPA's module default: 12 heads at any "
            "width, the same at D=768)",
        },
        "aim_probe": {
            "num_heads": "default: heads of 64 channels; EP's `--cls_features aim` runs pass --num_heads (default "
            "16): pass num_heads=16 for their checkpoints (AIM's own models use their trunk's heads)",
        },
    },
)


def _cfg(**kwargs: Any) -> dict[str, Any]:
    return {
        "url": "", "num_classes": 1000, "license": "apache-2.0", "paper_ids": FAMILY["paper_ids"],
        "paper_name": FAMILY["title"], "origin_url": FAMILY["origin_url"],
        "notes": "probing head: no weights; train it with `zoo probe`", **kwargs,
    }  # fmt: skip


def efficient_probe_param_count(embed_dim: int, num_classes: int, num_queries: int = 32, d_out: int = 1) -> int:
    """Trainable parameters of EP as the paper counts them: Q·D + D·D/d_out + (D/d_out)·C + C."""
    width = embed_dim // d_out
    return num_queries * embed_dim + embed_dim * width + width * num_classes + num_classes


def _drop_prefix(tokens: torch.Tensor, num_prefix_tokens: int, keep: bool) -> torch.Tensor:
    """(B, N, D) -> (B, N - prefix, D) unless ``keep``."""
    if tokens.ndim != 3:
        raise ValueError(f"probe input must be tokens (B, N, D); got shape {tuple(tokens.shape)}")
    if keep or num_prefix_tokens == 0:
        return tokens
    if tokens.shape[1] <= num_prefix_tokens:
        raise ValueError(
            f"probe input has {tokens.shape[1]} tokens but num_prefix_tokens={num_prefix_tokens}: no patch "
            "tokens are left; pass num_prefix_tokens=0 for backbones without a [CLS] token"
        )
    return tokens[:, num_prefix_tokens:]


class EfficientPooling(nn.Module):
    """EP pooling: Q learned queries in token space, one bias-free value projection, concatenated outputs.

    For tokens x (B, N, D): attention A = softmax_N(U x^T / sqrt(D)) (B, Q, N); values V = x W_V
    (B, N, D/d_out) split into Q channel slices V_j; output concat_j(A_j V_j) (B, D/d_out).

    ``forward`` computes A_j (x W_V_j) as (A_j x) W_V_j: the same number (associativity, no bias) but it
    projects Q pooled tokens instead of N tokens, which is where EP's speed comes from.
    ``forward_reference`` keeps the original order and is the definition the tests compare against.
    """

    def __init__(
        self,
        embed_dim: int,
        num_queries: int = 32,
        d_out: int = 1,
        num_prefix_tokens: int = 0,
        use_prefix_tokens: bool = False,
    ) -> None:
        super().__init__()
        if embed_dim < 1 or num_queries < 1 or d_out < 1:
            raise ValueError(f"EP: embed_dim={embed_dim}, num_queries={num_queries} and d_out={d_out} must all be >= 1")
        if embed_dim % (num_queries * d_out):
            raise ValueError(
                f"EP needs embed_dim divisible by num_queries * d_out: {embed_dim} % ({num_queries} * {d_out}) "
                f"= {embed_dim % (num_queries * d_out)}; pick num_queries from the divisors of {embed_dim // d_out}"
            )
        self.embed_dim, self.num_queries, self.d_out = embed_dim, num_queries, d_out
        self.out_dim = embed_dim // d_out
        self.num_prefix_tokens, self.use_prefix_tokens = num_prefix_tokens, use_prefix_tokens
        self.scale = embed_dim**-0.5  # the code's single head: head_dim = D
        self.queries = nn.Parameter(torch.randn(num_queries, embed_dim) * 0.02)
        self.v = nn.Linear(embed_dim, self.out_dim, bias=False)

    def attention(self, tokens: torch.Tensor) -> torch.Tensor:
        """Per-query attention maps (B, Q, N) over the pooled tokens; each row sums to 1."""
        x = _drop_prefix(tokens, self.num_prefix_tokens, self.use_prefix_tokens)
        return torch.matmul(x, (self.queries * self.scale).t()).transpose(1, 2).softmax(dim=-1)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, N, D) -> (B, D / d_out)."""
        x = _drop_prefix(tokens, self.num_prefix_tokens, self.use_prefix_tokens)
        attn = torch.matmul(x, (self.queries * self.scale).t()).transpose(1, 2).softmax(dim=-1)  # (B, Q, N)
        pooled = torch.bmm(attn, x)  # (B, Q, D)
        slice_dim = self.out_dim // self.num_queries
        weight = self.v.weight.view(self.num_queries, slice_dim, self.embed_dim)  # W_V_j as (Q, D/Q, D)
        return torch.einsum("bqd,qcd->bqc", pooled, weight).flatten(1)

    def forward_reference(self, tokens: torch.Tensor) -> torch.Tensor:
        """The original order of operations: project every token, then attend per channel slice."""
        x = _drop_prefix(tokens, self.num_prefix_tokens, self.use_prefix_tokens)
        B, N, _ = x.shape
        attn = ((self.queries * self.scale) @ x.transpose(1, 2)).softmax(dim=-1)  # (B, Q, N)
        values = self.v(x).view(B, N, self.num_queries, -1).permute(0, 2, 1, 3)  # (B, Q, N, D/(Q d_out))
        return (attn.unsqueeze(2) @ values).squeeze(2).flatten(1)


class ClassTokenPooling(nn.Module):
    """Token 0 ([CLS]): (B, N, D) -> (B, D)."""

    def __init__(self, embed_dim: int, num_prefix_tokens: int = 1) -> None:
        super().__init__()
        if num_prefix_tokens < 1:
            raise ValueError("the class-token probe needs a [CLS] token: num_prefix_tokens must be >= 1")
        self.out_dim = embed_dim

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if tokens.ndim != 3:
            raise ValueError(f"probe input must be tokens (B, N, D); got shape {tuple(tokens.shape)}")
        return tokens[:, 0]


class MeanPooling(nn.Module):
    """Global average of the patch tokens (GAP): (B, N, D) -> (B, D)."""

    def __init__(self, embed_dim: int, num_prefix_tokens: int = 0, use_prefix_tokens: bool = False) -> None:
        super().__init__()
        self.out_dim = embed_dim
        self.num_prefix_tokens, self.use_prefix_tokens = num_prefix_tokens, use_prefix_tokens

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return _drop_prefix(tokens, self.num_prefix_tokens, self.use_prefix_tokens).mean(dim=1)


def _default_heads(embed_dim: int) -> int:
    """Heads of 64 channels, as in the ViT the probe reads (768 -> 12, V-JEPA's ViT-B default; 1024 -> 16)."""
    heads = max(1, embed_dim // 64)
    while embed_dim % heads:
        heads -= 1
    return heads


def _check_heads(embed_dim: int, num_heads: int | None) -> int:
    if num_heads is not None and num_heads < 1:  # 0 must not fall back to the default silently
        raise ValueError(f"num_heads={num_heads} must be >= 1 (or None for heads of 64 channels)")
    num_heads = num_heads or _default_heads(embed_dim)
    if embed_dim % num_heads:
        raise ValueError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}; pick a divisor of it")
    return num_heads


class AttentivePooling(nn.Module):
    """V-JEPA's attentive pooler (``AttentivePooler`` of facebookresearch/jepa; the EP paper's ``jepa`` peer).

    Learned queries (1, Q, D) cross-attend to LayerNorm(tokens) with q / kv / proj projections (bias on
    all), the attention output is added to the query (residual), then a residual LayerNorm-MLP (ratio 4):
    ``q = u + proj(attn(W_q u, W_k LN(x), W_v LN(x))); q = q + MLP(LN(q))``. Init as V-JEPA: weights
    trunc-normal(0.02), zero biases, ``proj`` and ``fc2`` weights / sqrt(2). ``complete_block=False`` is
    V-JEPA's other option: the bare cross-attention (q / kv / proj, no norm, residual or MLP), i.e. a plain
    multi-head attention with q/k/v/o projections. V-JEPA uses one query; with several, zoo averages them
    (AIM's rule) so the output stays (B, D).

    Not timm's ``AttentionPoolLatent``: that is SigLIP's MAP head (no LayerNorm on the tokens, no query
    residual, latent init std D^-1/2), a different module with 1,536 fewer parameters; it is ``MAPPooling``.
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int | None = None,
        num_queries: int = 1,
        mlp_ratio: float = 4.0,
        complete_block: bool = True,
        num_prefix_tokens: int = 0,
        use_prefix_tokens: bool = False,
    ) -> None:
        super().__init__()
        self.num_heads = _check_heads(embed_dim, num_heads)
        self.out_dim, self.complete_block = embed_dim, complete_block
        self.num_prefix_tokens, self.use_prefix_tokens = num_prefix_tokens, use_prefix_tokens
        self.query = nn.Parameter(torch.zeros(1, num_queries, embed_dim))
        self.norm1 = nn.LayerNorm(embed_dim) if complete_block else nn.Identity()
        self.q = nn.Linear(embed_dim, embed_dim)
        self.kv = nn.Linear(embed_dim, 2 * embed_dim)
        self.proj = nn.Linear(embed_dim, embed_dim)
        self.norm2: nn.Module | None = None
        self.mlp: nn.Module | None = None
        if complete_block:
            self.norm2 = nn.LayerNorm(embed_dim)
            self.mlp = Mlp(embed_dim, int(embed_dim * mlp_ratio))
        nn.init.trunc_normal_(self.query, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        with torch.no_grad():  # V-JEPA's _rescale_blocks for layer 1
            self.proj.weight.div_(2**0.5)
            if self.mlp is not None:
                self.mlp.fc2.weight.div_(2**0.5)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, N, D) -> (B, D)."""
        x = self.norm1(_drop_prefix(tokens, self.num_prefix_tokens, self.use_prefix_tokens))
        B, N, D = x.shape
        H = self.num_heads
        query = self.query.expand(B, -1, -1)  # (B, Q, D)
        q = self.q(query).view(B, -1, H, D // H).transpose(1, 2)
        k, v = self.kv(x).view(B, N, 2, H, D // H).permute(2, 0, 3, 1, 4)
        out = self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, -1, D))
        if self.complete_block:
            out = query + out
            out = out + self.mlp(self.norm2(out))
        return out.mean(dim=1)


class MAPPooling(nn.Module):
    """Multihead attention pooling (MAP, SigLIP) on timm's ``AttentionPoolLatent``: latent queries, q / kv / proj
    with bias, then ``x + MLP(norm(x))``. Several queries are averaged: (B, N, D) -> (B, D).

    ``norm=True`` with heads of 64 channels is the head timm's ViTs build for ``global_pool='map'``
    (``map_probe``); ``norm=False`` with 8 heads is the ``siglip`` peer of the EP repository
    (``attentive_probe``), whose ``AttentionPoolLatent`` gets no ``norm_layer``.
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int | None = None,
        num_queries: int = 1,
        mlp_ratio: float = 4.0,
        norm: bool = True,
        num_prefix_tokens: int = 0,
        use_prefix_tokens: bool = False,
    ) -> None:
        super().__init__()
        self.out_dim = embed_dim
        self.num_prefix_tokens, self.use_prefix_tokens = num_prefix_tokens, use_prefix_tokens
        self.attn_pool = AttentionPoolLatent(
            embed_dim, num_heads=_check_heads(embed_dim, num_heads), mlp_ratio=mlp_ratio, latent_len=num_queries,
            pool_type="token" if num_queries == 1 else "avg",
            norm_layer=partial(nn.LayerNorm, eps=1e-6) if norm else None,
        )  # fmt: skip

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, N, D) -> (B, D)."""
        return self.attn_pool(_drop_prefix(tokens, self.num_prefix_tokens, self.use_prefix_tokens))


class AIMPooling(nn.Module):
    """AIM's attentive probe (``AttentionPoolingClassifier`` of apple/ml-aim; the EP paper's ``aim`` peer).

    Non-affine BatchNorm over the token channels, learned queries used directly as q (no q projection),
    bias-free W_k and W_v, multi-head attention, no output projection, no MLP; the queries' outputs are
    averaged: (B, N, D) -> (B, D).
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int | None = None,
        num_queries: int = 1,
        num_prefix_tokens: int = 0,
        use_prefix_tokens: bool = False,
    ) -> None:
        super().__init__()
        self.num_heads = _check_heads(embed_dim, num_heads)
        self.out_dim = embed_dim
        self.num_prefix_tokens, self.use_prefix_tokens = num_prefix_tokens, use_prefix_tokens
        self.bn = nn.BatchNorm1d(embed_dim, affine=False, eps=1e-6)
        self.query = nn.Parameter(torch.randn(1, num_queries, embed_dim) * 0.02)
        self.k = nn.Linear(embed_dim, embed_dim, bias=False)
        self.v = nn.Linear(embed_dim, embed_dim, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = _drop_prefix(tokens, self.num_prefix_tokens, self.use_prefix_tokens)
        x = self.bn(x.transpose(1, 2)).transpose(1, 2)
        B, N, D = x.shape
        H = self.num_heads
        q = self.query.expand(B, -1, -1).reshape(B, -1, H, D // H).transpose(1, 2)
        k = self.k(x).view(B, N, H, D // H).transpose(1, 2)
        v = self.v(x).view(B, N, H, D // H).transpose(1, 2)
        return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, -1, D).mean(dim=1)


ABMIL_SELF_ATTENTION = ("none", "map", "both")


class ABMILPooling(nn.Module):
    """ABMIL-style pooling ("Beyond [cls]", Przewięźlikowski et al.; ``ABMILPHead`` of the EP repository).

    A single-head self-attention (timm's ``Attention``: qkv without bias, proj with bias) over the tokens, a
    2-layer tanh MLP giving one softmax weight per token, and the weighted sum: (B, N, D) -> (B, D).
    ``self_attention`` says where the self-attention is used, as ``--abmilp_sa``: ``'both'`` (the default) for
    the weights and the pooled values, ``'map'`` for the weights only (values are the raw tokens), ``'none'``
    not at all (no self-attention parameters).
    """

    def __init__(
        self,
        embed_dim: int,
        self_attention: str = "both",
        hidden_dim: int | None = None,
        num_prefix_tokens: int = 0,
        use_prefix_tokens: bool = False,
    ) -> None:
        super().__init__()
        if self_attention not in ABMIL_SELF_ATTENTION:
            raise ValueError(f"ABMIL: self_attention={self_attention!r}; expected one of {ABMIL_SELF_ATTENTION}")
        self.out_dim, self.self_attention = embed_dim, self_attention
        self.num_prefix_tokens, self.use_prefix_tokens = num_prefix_tokens, use_prefix_tokens
        self.self_attn = Attention(embed_dim, num_heads=1) if self_attention != "none" else None
        hidden_dim = hidden_dim or embed_dim
        self.score = nn.Sequential(nn.Linear(embed_dim, hidden_dim), nn.Tanh(), nn.Linear(hidden_dim, 1))

    def _weights_and_values(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Token weights (B, N) and the tokens they pool (B, N, D)."""
        x = _drop_prefix(tokens, self.num_prefix_tokens, self.use_prefix_tokens)
        attended = self.self_attn(x) if self.self_attn is not None else x
        weights = self.score(attended).squeeze(-1).softmax(dim=-1)  # 'none': attended is x
        return weights, attended if self.self_attention == "both" else x

    def attention(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token weights (B, N); each row sums to 1."""
        return self._weights_and_values(tokens)[0]

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, N, D) -> (B, D)."""
        weights, values = self._weights_and_values(tokens)
        return torch.bmm(weights.unsqueeze(1), values).squeeze(1)


class SimPooling(nn.Module):
    """SimPool (Psomas et al., ICCV 2023; ``SimPool`` of billpsomas/simpool and of the EP repository).

    The query is W_q applied to the GAP of the raw tokens; keys are W_k LN(x); the output is the
    attention-weighted sum of the normalised tokens LN(x). One head, no q / k bias, no gamma:
    (B, N, D) -> (B, D).
    """

    def __init__(self, embed_dim: int, num_prefix_tokens: int = 0, use_prefix_tokens: bool = False) -> None:
        super().__init__()
        self.out_dim = embed_dim
        self.num_prefix_tokens, self.use_prefix_tokens = num_prefix_tokens, use_prefix_tokens
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.q = nn.Linear(embed_dim, embed_dim, bias=False)
        self.k = nn.Linear(embed_dim, embed_dim, bias=False)
        self.scale = embed_dim**-0.5

    def _weights_and_values(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Token weights (B, N) and the normalised tokens LN(x) they pool (B, N, D)."""
        x = _drop_prefix(tokens, self.num_prefix_tokens, self.use_prefix_tokens)
        normed = self.norm(x)
        q = self.q(x.mean(dim=1, keepdim=True))  # (B, 1, D): the GAP of the raw tokens, as SimPool
        weights = (q @ self.k(normed).transpose(1, 2) * self.scale).softmax(dim=-1)  # (B, 1, N)
        return weights.squeeze(1), normed

    def attention(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token weights (B, N); each row sums to 1."""
        return self._weights_and_values(tokens)[0]

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, N, D) -> (B, D)."""
        weights, values = self._weights_and_values(tokens)
        return torch.bmm(weights.unsqueeze(1), values).squeeze(1)


class Probe(nn.Module):
    """``pool -> BatchNorm1d(width, affine=False, eps=1e-6) -> Linear(width, num_classes)``.

    Args:
        pool: a pooling module mapping (B, N, D) to (B, width) with an ``out_dim`` attribute.
        num_classes: classifier outputs.
    """

    def __init__(self, pool: nn.Module, num_classes: int) -> None:
        super().__init__()
        if num_classes < 1:  # a probe is its classifier: forward_pool gives the features without one
            raise ValueError(f"num_classes={num_classes}: a probe needs >= 1 class; use forward_pool for features")
        self.pool = pool
        self.num_classes = num_classes
        self.num_features = pool.out_dim
        self.norm = nn.BatchNorm1d(pool.out_dim, affine=False, eps=1e-6)
        self.head = nn.Linear(pool.out_dim, num_classes)
        nn.init.trunc_normal_(self.head.weight, std=0.01)  # MAE linear-probe init
        nn.init.zeros_(self.head.bias)

    def forward_pool(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, N, D) -> (B, width)."""
        return self.pool(tokens)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, N, D) -> logits (B, num_classes)."""
        return self.head(self.norm(self.pool(tokens)))

    def pool_parameters(self) -> int:
        """Trainable parameters of the pooling alone (the classifier is the same width for every probe)."""
        return sum(p.numel() for p in self.pool.parameters() if p.requires_grad)

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.head = nn.Linear(self.num_features, num_classes)


# The EP repository's poolings (named by their --cls_features flag), each told apart by a key only it has,
# the zoo pooling that reproduces it, the zoo entry to build, and its keys renamed in order (first match wins).
_AUTHORS_POOLINGS: dict[str, tuple[type | tuple[type, ...], str, tuple[tuple[str, str], ...]]] = {
    "ep": (EfficientPooling, "efficient_probe", (("cls_token", "queries"),)),
    "siglip": (MAPPooling, "attentive_probe", (("", "attn_pool."),)),
    "jepa": (
        AttentivePooling, "vjepa_probe",
        (("query_tokens", "query"), ("cross_attention_block.xattn.", ""), ("cross_attention_block.", "")),
    ),
    "aim": (AIMPooling, "aim_probe", (("cls_token", "query"),)),
    "abmilp": (ABMILPooling, "abmil_probe", (("attention_predictor.", "score."),)),
    "simpool": (SimPooling, "simpool_probe", (("norm_patches.", "norm."), ("wq.", "q."), ("wk.", "k."))),
    "cls / pos": ((ClassTokenPooling, MeanPooling), "linear_probe_cls' or 'linear_probe_avg", ()),  # no weights
}  # fmt: skip
_HEAD_PREFIX = re.compile(r"^((?:.+\.)?head\.)\d+\.")  # 'head.0.v.weight', 'model.head.2.bias' -> the prefix


def _authors_pooling(keys: set[str]) -> str:
    """The EP-repo ``--cls_features`` pooling whose state dict has ``keys`` ('other' when zoo has none of it)."""
    if not keys:
        return "cls / pos"
    if "latent" in keys:
        return "siglip"
    if "query_tokens" in keys:
        return "jepa"
    if any(k.startswith("attention_predictor.") for k in keys):
        return "abmilp"
    if "wq.weight" in keys and "wk.weight" in keys:
        return "simpool"
    if "cls_token" in keys:
        return "aim" if "k.weight" in keys else "ep"
    return "other"  # esimpool, clip, coca, cait, dinovit, dolg, cbam, cae


def _authors_head(state_dict: dict[str, Any]) -> dict[str, Any] | None:
    """The EP repository's ``model.head`` (``Sequential``: keys '0.*', '1.*', '2.*') in ``state_dict``: the dict
    itself when it holds the head alone, the ``head.``-prefixed keys of a whole model (backbone dropped), or
    None when it is neither."""
    if state_dict and all(k.split(".", 1)[0].isdigit() for k in state_dict):
        return state_dict
    prefixes = {m.group(1) for m in map(_HEAD_PREFIX.match, state_dict) if m}
    if not prefixes:
        return None
    if len(prefixes) > 1:
        raise ValueError(
            f"checkpoint holds several probe heads ({', '.join(sorted(prefixes))}); extract one of them, e.g. "
            f"{{k[len(p):]: v for k, v in sd.items() if k.startswith(p)}} with p = {sorted(prefixes)[0]!r}"
        )
    (prefix,) = prefixes
    return {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}


def _trained_with(pooling: str, pool: dict[str, torch.Tensor], classifier: torch.Tensor) -> str:
    """The zoo keywords an authors' head was trained with, read from its shapes ('embed_dim=768, ...')."""
    args: dict[str, int | float] = {}
    if pooling == "ep":
        queries = pool["cls_token"]
        args = dict(embed_dim=queries.shape[-1], num_queries=queries.shape[-2])
        if queries.shape[-1] != pool["v.weight"].shape[0]:
            args["d_out"] = queries.shape[-1] // pool["v.weight"].shape[0]
    else:
        args["embed_dim"] = classifier.shape[1]
        query = pool.get("latent", pool.get("query_tokens", pool.get("cls_token")))
        if query is not None and query.shape[-2] != 1:
            args["num_queries"] = query.shape[-2]
        hidden = pool.get("mlp.fc1.weight", pool.get("cross_attention_block.mlp.fc1.weight"))
        if hidden is not None and hidden.shape[0] != 4 * hidden.shape[1]:
            args["mlp_ratio"] = hidden.shape[0] / hidden.shape[1]
    args["num_classes"] = classifier.shape[0]
    return ", ".join(f"{k}={v}" for k, v in args.items())


def checkpoint_filter_fn(state_dict: dict[str, Any], model: nn.Module) -> dict[str, Any]:
    """Map a billpsomas/efficient-probing head checkpoint to zoo's keys; zoo's own layout passes unchanged.

    The EP repository's probe is ``model.head = Sequential(pool, BatchNorm1d, Linear)`` (``Sequential(BatchNorm1d,
    Linear)`` for the linear probes). Its probing runs save that head alone (keys ``0.*``, ``1.*``, ``2.*``, under
    ``'model'``; ``tools/export_ep_heads.py`` re-saves them under ``'state_dict'``), and ``--finetuning`` runs the
    whole model (backbone keys + ``head.0.*``...): the head's keys are kept, the backbone's dropped. Pooling keys are
    renamed (and EP's queries ``cls_token`` (1, Q, D) reshaped to (Q, D)); ``1.*`` -> ``norm.*``, ``2.*`` ->
    ``head.*``.

    Raises:
        ValueError: the checkpoint holds another probe than ``model`` (naming the zoo entry to build), a pooling
            zoo does not implement, or weights of other sizes (naming the keywords it was trained with).
    """
    head = _authors_head(state_dict) if isinstance(model, Probe) else None
    if head is None:  # zoo's layout (pool.*, norm.*, head.weight: model.state_dict(), a `zoo probe` checkpoint)
        return state_dict  # or neither layout: the strict load names what does not fit
    # with a pooling the classifier is module 2 (BatchNorm1d(affine=False) has no weight); without one, module 1
    norm_at, fc_at = ("1.", "2.") if "2.weight" in head else ("0.", "1.")
    pool = {k[2:]: v for k, v in head.items() if k.startswith("0.")} if norm_at == "1." else {}
    if fc_at + "weight" not in head:
        raise ValueError(
            f"checkpoint looks like an EP-repo probe head but holds no classifier ({fc_at}weight); keys: "
            f"{', '.join(sorted(head)[:6])}"
        )
    pooling = _authors_pooling(set(pool))
    if pooling == "other":
        raise ValueError(
            "checkpoint holds an EP-repo head with a pooling zoo does not implement (keys "
            f"0.{', 0.'.join(sorted(pool)[:4])}); zoo loads the heads of --cls_features "
            f"{', '.join(_AUTHORS_POOLINGS)} and their _all variants"
        )
    pool_class, entry, renames = _AUTHORS_POOLINGS[pooling]
    if not isinstance(model.pool, pool_class):
        raise ValueError(
            f"checkpoint holds the EP repository's '{pooling}' probe head, not a {type(model.pool).__name__} one: "
            "build it with "
            f"zoo.create_model('{entry}', {_trained_with(pooling, pool, head[fc_at + 'weight'])}, checkpoint_path=...)"
        )
    out: dict[str, Any] = {}
    for key, value in pool.items():
        for old, new in renames:
            if key.startswith(old):
                key = new + key[len(old) :]
                break
        out["pool." + key] = value
    if pooling == "ep":
        out["pool.queries"] = out["pool.queries"].reshape(pool["cls_token"].shape[-2:])  # (1, Q, D) -> (Q, D)
    out.update({"norm." + k[2:]: v for k, v in head.items() if k.startswith(norm_at)})
    out.update({"head." + k[2:]: v for k, v in head.items() if k.startswith(fc_at)})
    own = model.state_dict()
    if any(k in own and v.shape != own[k].shape for k, v in out.items()):
        raise ValueError(
            f"checkpoint holds an EP-repo '{pooling}' head of other sizes than this model: it was trained with "
            f"{_trained_with(pooling, pool, head[fc_at + 'weight'])}; pass those to zoo.create_model('{entry}', ...)"
        )
    return out


def _build(pool: nn.Module, num_classes: int, pretrained: bool, pretrained_cfg: PretrainedCfg | None, name: str):
    if pretrained:  # zoo.create_model builds heads with pretrained=False and loads the file itself
        raise RuntimeError(
            f"{name!r} has no published weights: probes are trained on a frozen backbone (`zoo probe`, or the "
            f"authors' code); load one with zoo.create_model({name!r}, embed_dim=..., num_classes=..., "
            "checkpoint_path=...)"
        )
    model = Probe(pool, num_classes)
    model.pretrained_cfg = pretrained_cfg.to_dict() if pretrained_cfg is not None else {}
    return model


default_cfgs = generate_default_cfgs(
    {
        "efficient_probe.untrained": _cfg(),
        "linear_probe_cls.untrained": _cfg(),
        "linear_probe_avg.untrained": _cfg(),
        "attentive_probe.untrained": _cfg(
            paper_ids="arXiv:2303.15343", notes="SigLIP MAP head as EP's `siglip` peer (8 heads, no LayerNorm)"
        ),
        "map_probe.untrained": _cfg(
            paper_ids="arXiv:2303.15343", notes="timm's MAP head (global_pool='map': 64-channel heads, LayerNorm)"
        ),
        "vjepa_probe.untrained": _cfg(paper_ids="arXiv:2404.08471", notes="V-JEPA attentive pooler"),
        "aim_probe.untrained": _cfg(paper_ids="arXiv:2401.08541", notes="AIM attentive probe (W_k, W_v)"),
        "mha_probe.untrained": _cfg(notes="bare multi-head cross-attention, q/k/v/o, no MLP"),
        "abmil_probe.untrained": _cfg(paper_ids="arXiv:2407.11126", notes="ABMIL-style pooling (Beyond [cls], abmilp)"),
        "simpool_probe.untrained": _cfg(paper_ids="arXiv:2309.06891", notes="SimPool"),
    }
)


@register_model(kind="probe")
def efficient_probe(
    pretrained: bool = False,
    pretrained_cfg: PretrainedCfg | None = None,
    embed_dim: int = 768,
    num_classes: int = 1000,
    num_queries: int = 32,
    d_out: int = 1,
    num_prefix_tokens: int = 0,
    use_prefix_tokens: bool = False,
) -> Probe:
    """EP: (B, N, D) -> (B, C); ``use_prefix_tokens=True`` is the paper's ``ep_all``."""
    pool = EfficientPooling(embed_dim, num_queries, d_out, num_prefix_tokens, use_prefix_tokens)
    return _build(pool, num_classes, pretrained, pretrained_cfg, "efficient_probe")


@register_model(kind="probe")
def linear_probe_cls(
    pretrained: bool = False,
    pretrained_cfg: PretrainedCfg | None = None,
    embed_dim: int = 768,
    num_classes: int = 1000,
    num_prefix_tokens: int = 1,
) -> Probe:
    """Linear probe on token 0 ([CLS])."""
    return _build(
        ClassTokenPooling(embed_dim, num_prefix_tokens), num_classes, pretrained, pretrained_cfg, "linear_probe_cls"
    )


@register_model(kind="probe")
def linear_probe_avg(
    pretrained: bool = False,
    pretrained_cfg: PretrainedCfg | None = None,
    embed_dim: int = 768,
    num_classes: int = 1000,
    num_prefix_tokens: int = 0,
) -> Probe:
    """Linear probe on the mean of the patch tokens (GAP)."""
    pool = MeanPooling(embed_dim, num_prefix_tokens)
    return _build(pool, num_classes, pretrained, pretrained_cfg, "linear_probe_avg")


@register_model(kind="probe")
def attentive_probe(
    pretrained: bool = False,
    pretrained_cfg: PretrainedCfg | None = None,
    embed_dim: int = 768,
    num_classes: int = 1000,
    num_heads: int = 8,
    num_queries: int = 1,
    mlp_ratio: float = 4.0,
    num_prefix_tokens: int = 0,
    use_prefix_tokens: bool = False,
) -> Probe:
    """The multi-head attentive probe EP's paper compares with (its ``siglip`` peer): SigLIP's MAP head with a
    learned query, q/k/v/o projections and a residual MLP, 8 heads, no LayerNorm (timm's
    ``AttentionPoolLatent(in_features=D)``)."""
    pool = MAPPooling(embed_dim, num_heads, num_queries, mlp_ratio, False, num_prefix_tokens, use_prefix_tokens)
    return _build(pool, num_classes, pretrained, pretrained_cfg, "attentive_probe")


@register_model(kind="probe")
def map_probe(
    pretrained: bool = False,
    pretrained_cfg: PretrainedCfg | None = None,
    embed_dim: int = 768,
    num_classes: int = 1000,
    num_heads: int | None = None,
    num_queries: int = 1,
    mlp_ratio: float = 4.0,
    num_prefix_tokens: int = 0,
    use_prefix_tokens: bool = False,
) -> Probe:
    """timm's MAP head as its ViTs build it (``global_pool='map'``): heads of 64 channels unless ``num_heads`` is
    given, LayerNorm(eps=1e-6) before the residual MLP."""
    pool = MAPPooling(embed_dim, num_heads, num_queries, mlp_ratio, True, num_prefix_tokens, use_prefix_tokens)
    return _build(pool, num_classes, pretrained, pretrained_cfg, "map_probe")


@register_model(kind="probe")
def vjepa_probe(
    pretrained: bool = False,
    pretrained_cfg: PretrainedCfg | None = None,
    embed_dim: int = 768,
    num_classes: int = 1000,
    num_heads: int | None = None,
    num_queries: int = 1,
    mlp_ratio: float = 4.0,
    num_prefix_tokens: int = 0,
    use_prefix_tokens: bool = False,
) -> Probe:
    """V-JEPA attentive pooler: LayerNorm on tokens, q/kv/proj, query residual, residual MLP (ratio 4); heads of
    64 channels unless ``num_heads`` is given (EP's ``jepa`` runs: 16)."""
    pool = AttentivePooling(embed_dim, num_heads, num_queries, mlp_ratio, True, num_prefix_tokens, use_prefix_tokens)
    return _build(pool, num_classes, pretrained, pretrained_cfg, "vjepa_probe")


@register_model(kind="probe")
def aim_probe(
    pretrained: bool = False,
    pretrained_cfg: PretrainedCfg | None = None,
    embed_dim: int = 768,
    num_classes: int = 1000,
    num_heads: int | None = None,
    num_queries: int = 1,
    num_prefix_tokens: int = 0,
    use_prefix_tokens: bool = False,
) -> Probe:
    """AIM attentive probe: BatchNorm on tokens, learned query, bias-free W_k / W_v, no q / o projection; heads of
    64 channels unless ``num_heads`` is given (EP's ``aim`` runs: 16)."""
    pool = AIMPooling(embed_dim, num_heads, num_queries, num_prefix_tokens, use_prefix_tokens)
    return _build(pool, num_classes, pretrained, pretrained_cfg, "aim_probe")


@register_model(kind="probe")
def mha_probe(
    pretrained: bool = False,
    pretrained_cfg: PretrainedCfg | None = None,
    embed_dim: int = 768,
    num_classes: int = 1000,
    num_heads: int | None = None,
    num_queries: int = 1,
    num_prefix_tokens: int = 0,
    use_prefix_tokens: bool = False,
) -> Probe:
    """Bare multi-head cross-attention with q/k/v/o and bias, no norm or MLP (V-JEPA's ``complete_block=False``)."""
    pool = AttentivePooling(embed_dim, num_heads, num_queries, 0.0, False, num_prefix_tokens, use_prefix_tokens)
    return _build(pool, num_classes, pretrained, pretrained_cfg, "mha_probe")


@register_model(kind="probe")
def abmil_probe(
    pretrained: bool = False,
    pretrained_cfg: PretrainedCfg | None = None,
    embed_dim: int = 768,
    num_classes: int = 1000,
    self_attention: str = "both",
    num_prefix_tokens: int = 0,
    use_prefix_tokens: bool = False,
) -> Probe:
    """ABMIL-style pooling with EP's ``abmilp`` defaults: single-head self-attention used for the weights and the
    pooled values (``self_attention='both'``; ``'map'``: weights only; ``'none'``), 2-layer tanh scorer, patch tokens
    (``use_prefix_tokens=True`` is ``abmilp_all``)."""
    pool = ABMILPooling(embed_dim, self_attention, None, num_prefix_tokens, use_prefix_tokens)
    return _build(pool, num_classes, pretrained, pretrained_cfg, "abmil_probe")


@register_model(kind="probe")
def simpool_probe(
    pretrained: bool = False,
    pretrained_cfg: PretrainedCfg | None = None,
    embed_dim: int = 768,
    num_classes: int = 1000,
    num_prefix_tokens: int = 0,
    use_prefix_tokens: bool = False,
) -> Probe:
    """SimPool: query W_q GAP(x), keys W_k LN(x), attention-weighted LN(x); ``use_prefix_tokens=True`` is
    ``simpool_all``."""
    pool = SimPooling(embed_dim, num_prefix_tokens, use_prefix_tokens)
    return _build(pool, num_classes, pretrained, pretrained_cfg, "simpool_probe")
