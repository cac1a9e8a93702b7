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
billpsomas/efficient-probing defines it), ``linear_probe_cls``, ``linear_probe_avg``,
``attentive_probe`` (the multi-head attentive probe with full q/k/v/o projections and an MLP: SigLIP's MAP
head, timm's ``AttentionPoolLatent``), ``vjepa_probe`` (V-JEPA's attentive pooler as its code builds it),
``aim_probe`` (AIM's attentive probe: BN on tokens, W_k / W_v only), ``mha_probe`` (bare multi-head
cross-attention with q/k/v/o, no MLP: V-JEPA's ``complete_block=False``), ``abmil_probe`` (ABMIL-style
pooling of "Beyond [cls]") and ``simpool_probe`` (SimPool).

Sizes of the pooling alone at D = 768 (the classifier adds (D + 1) C for every probe; 769,000 at C = 1000):
EP (Q = 32) 614,400; AIM 1,180,416; SimPool 1,182,720; bare q/k/v/o 2,363,136; ABMIL 2,953,729;
MAP 7,087,104; V-JEPA 7,088,640.

The issue's benchmark target (EP at most 1/3 of the trainable parameters of "the multi-head attentive probe
with full q/k/v/o projections") is measured against ``attentive_probe``; counted as the EP paper counts
trainable parameters (whole probe, classifier included: EP = 1,383,400) the ratio is 0.176, pooling alone
0.087. The smaller peers miss it on the whole-probe count: ``mha_probe`` 0.44 (pooling 0.26), ``aim_probe``
0.71 (pooling 0.52). ``benchmarks/probing_bench.py`` prints both countings for every peer.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import AttentionPoolLatent, Mlp
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
    "efficient_probe_param_count",
]

FAMILY = dict(
    name="Efficient Probing",
    title="Attention, Please! Revisiting Attentive Probing Through the Lens of Efficiency",
    paper_ids="arXiv:2506.10178",
    origin_url="https://github.com/billpsomas/efficient-probing",
    implementation="zoo (`zoo.heads.probing`), written from the paper and `poolings/ep.py`; peers written by zoo",
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
        "neither the code nor the figure; zoo follows the code). Peers: linear probes on [CLS] and on mean "
        "tokens, the multi-head attentive probe with q/k/v/o + MLP (SigLIP MAP via timm's AttentionPoolLatent), "
        "V-JEPA's pooler, AIM's probe (W_k / W_v only), bare q/k/v/o cross-attention, ABMIL-style pooling and "
        "SimPool."
    ),
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
    """SigLIP's multihead attention pooling (MAP), reusing timm's ``AttentionPoolLatent`` as timm's ViTs
    build it for ``global_pool='map'``: latent queries, q / kv / proj with bias, then ``x + MLP(LN(x))``.
    Several queries are averaged: (B, N, D) -> (B, D)."""

    def __init__(
        self,
        embed_dim: int,
        num_heads: int | None = None,
        num_queries: int = 1,
        mlp_ratio: float = 4.0,
        num_prefix_tokens: int = 0,
        use_prefix_tokens: bool = False,
    ) -> None:
        super().__init__()
        self.out_dim = embed_dim
        self.num_prefix_tokens, self.use_prefix_tokens = num_prefix_tokens, use_prefix_tokens
        self.attn_pool = AttentionPoolLatent(
            embed_dim, num_heads=_check_heads(embed_dim, num_heads), mlp_ratio=mlp_ratio, latent_len=num_queries,
            pool_type="token" if num_queries == 1 else "avg", norm_layer=partial(nn.LayerNorm, eps=1e-6),
        )  # fmt: skip

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
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


class ABMILPooling(nn.Module):
    """ABMIL-style pooling ("Beyond [cls]", Przewięźlikowski et al.): optional single-head self-attention,
    then a 2-layer tanh attention MLP gives one softmax weight per token: (B, N, D) -> (B, D)."""

    def __init__(
        self,
        embed_dim: int,
        hidden_dim: int | None = None,
        self_attention: bool = True,
        num_prefix_tokens: int = 0,
        use_prefix_tokens: bool = True,
    ) -> None:
        super().__init__()
        self.out_dim = embed_dim
        self.num_prefix_tokens, self.use_prefix_tokens = num_prefix_tokens, use_prefix_tokens
        self.sa: nn.MultiheadAttention | None = None
        if self_attention:
            self.sa = nn.MultiheadAttention(embed_dim, num_heads=1, batch_first=True)
        hidden_dim = hidden_dim or embed_dim
        self.score = nn.Sequential(nn.Linear(embed_dim, hidden_dim), nn.Tanh(), nn.Linear(hidden_dim, 1))

    def attention(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token weights (B, N)."""
        x = _drop_prefix(tokens, self.num_prefix_tokens, self.use_prefix_tokens)
        if self.sa is not None:
            x = self.sa(x, x, x, need_weights=False)[0]
        return self.score(x).squeeze(-1).softmax(dim=-1)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = _drop_prefix(tokens, self.num_prefix_tokens, self.use_prefix_tokens)
        # the weights come from the self-attended tokens; the weighted sum is over the raw tokens
        return torch.bmm(self.attention(tokens).unsqueeze(1), x).squeeze(1)


class SimPooling(nn.Module):
    """SimPool (Psomas et al., ICCV 2023): the GAP of the (normalised) tokens is the query; W_q and W_k
    project query and keys; the attention-weighted sum of the tokens is the output: (B, N, D) -> (B, D)."""

    def __init__(self, embed_dim: int, num_prefix_tokens: int = 0, use_prefix_tokens: bool = False) -> None:
        super().__init__()
        self.out_dim = embed_dim
        self.num_prefix_tokens, self.use_prefix_tokens = num_prefix_tokens, use_prefix_tokens
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.q = nn.Linear(embed_dim, embed_dim)
        self.k = nn.Linear(embed_dim, embed_dim)
        self.scale = embed_dim**-0.5

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = _drop_prefix(tokens, self.num_prefix_tokens, self.use_prefix_tokens)
        keys = self.norm(x)
        q = self.q(keys.mean(dim=1, keepdim=True))  # (B, 1, D)
        attn = (q @ self.k(keys).transpose(1, 2) * self.scale).softmax(dim=-1)  # (B, 1, N)
        return (attn @ x).squeeze(1)


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


def _build(pool: nn.Module, num_classes: int, pretrained: bool, pretrained_cfg: PretrainedCfg | None, name: str):
    if pretrained:
        raise RuntimeError(
            f"{name!r} has no pretrained weights: probes are trained on a frozen backbone with `zoo probe`; load "
            "your own with zoo.create_model(..., checkpoint_path=...)"
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
            paper_ids="arXiv:2303.15343", notes="multi-head attentive probe, q/k/v/o + MLP (SigLIP MAP, timm)"
        ),
        "vjepa_probe.untrained": _cfg(paper_ids="arXiv:2404.08471", notes="V-JEPA attentive pooler"),
        "aim_probe.untrained": _cfg(paper_ids="arXiv:2401.08541", notes="AIM attentive probe (W_k, W_v)"),
        "mha_probe.untrained": _cfg(notes="bare multi-head cross-attention, q/k/v/o, no MLP"),
        "abmil_probe.untrained": _cfg(paper_ids="arXiv:2407.11126", notes="ABMIL-style pooling (Beyond [cls])"),
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
    num_heads: int | None = None,
    num_queries: int = 1,
    mlp_ratio: float = 4.0,
    num_prefix_tokens: int = 0,
) -> Probe:
    """The multi-head attentive probe: learned query, q/k/v/o projections, residual MLP (SigLIP MAP, timm's
    ``AttentionPoolLatent``); heads of 64 channels unless ``num_heads`` is given."""
    pool = MAPPooling(embed_dim, num_heads, num_queries, mlp_ratio, num_prefix_tokens)
    return _build(pool, num_classes, pretrained, pretrained_cfg, "attentive_probe")


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
) -> Probe:
    """V-JEPA attentive pooler: LayerNorm on tokens, q/kv/proj, query residual, residual MLP (ratio 4)."""
    pool = AttentivePooling(embed_dim, num_heads, num_queries, mlp_ratio, True, num_prefix_tokens)
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
) -> Probe:
    """AIM attentive probe: BatchNorm on tokens, learned query, bias-free W_k / W_v, no q / o projection."""
    pool = AIMPooling(embed_dim, num_heads, num_queries, num_prefix_tokens)
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
) -> Probe:
    """Bare multi-head cross-attention with q/k/v/o and bias, no norm or MLP (V-JEPA's ``complete_block=False``)."""
    pool = AttentivePooling(embed_dim, num_heads, num_queries, 0.0, False, num_prefix_tokens)
    return _build(pool, num_classes, pretrained, pretrained_cfg, "mha_probe")


@register_model(kind="probe")
def abmil_probe(
    pretrained: bool = False,
    pretrained_cfg: PretrainedCfg | None = None,
    embed_dim: int = 768,
    num_classes: int = 1000,
    self_attention: bool = True,
    num_prefix_tokens: int = 0,
) -> Probe:
    """ABMIL-style pooling over all tokens (defaults of "Beyond [cls]": self-attention first)."""
    pool = ABMILPooling(embed_dim, None, self_attention, num_prefix_tokens, use_prefix_tokens=True)
    return _build(pool, num_classes, pretrained, pretrained_cfg, "abmil_probe")


@register_model(kind="probe")
def simpool_probe(
    pretrained: bool = False,
    pretrained_cfg: PretrainedCfg | None = None,
    embed_dim: int = 768,
    num_classes: int = 1000,
    num_prefix_tokens: int = 0,
) -> Probe:
    """SimPool: GAP query, W_q / W_k, attention-weighted tokens."""
    return _build(SimPooling(embed_dim, num_prefix_tokens), num_classes, pretrained, pretrained_cfg, "simpool_probe")
