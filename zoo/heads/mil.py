"""Multiple-instance learning (MIL) heads for whole-slide images: ACMIL and its peers.

A MIL head classifies a *bag* of instance features (the frozen patch embeddings of one slide) into
slide-level classes. Every head here has the same small contract (``mil_head`` kind in the registry):

* built with ``in_dim=`` (instance feature size D) and ``num_classes=`` (C), plus its own options;
* ``forward(feats, mask=None) -> dict``: ``feats`` is one bag ``(N, D)`` or a padded batch ``(B, N, D)``;
  ``mask`` is ``(B, N)`` boolean, True for a real instance, False for padding (default: all real).
  float16 inputs are accepted (cast to the head's dtype). The dict holds

  * ``logits``: ``(B, C)``, the only output used for evaluation;
  * ``attention``: ``(B, K, N)`` normalised instance weights per attention branch (0 on padding), the map
    drawn by heatmaps;
  * where the method has them: ``aux_logits`` (ACMIL branch logits, TransMIL none, ...) and
    ``aux_losses`` (a dict of scalar regularisers computed in ``forward``);
* ``loss(out, target) -> dict`` with ``loss`` (what to back-propagate) and its named terms, so a
  training loop needs no per-method code. ``target`` is ``(B,)`` class indices.

Training-only behaviour (ACMIL's stochastic top-K instance masking, CLAM's instance sampling) is keyed on
``self.training``.

Heads (``zoo.list_models('*mil*')``):

* ``mean_mil``, ``max_mil``: instance-pooling baselines.
* ``abmil``: gated attention MIL (Ilse, Tomczak, Welling, ICML 2018, arXiv:1802.04712).
* ``acmil``: Attention-Challenging MIL, gated variant ``ACMIL_GA`` (Zhang et al., ECCV 2024,
  arXiv:2311.07125), reimplemented from the paper and the description of its official code
  (``dazhangyu123/ACMIL``): DimReduction (no bias) + ReLU, M = 5 gated-attention branches, Stochastic
  Top-K Instance Masking (K = 10, p = 0.6, training only), per-branch classifiers, slide classifier on the
  mean of the branch softmaxes; loss = slide CE + branch CE (M > 1) + diversity (mean pairwise cosine
  similarity of the branch attentions). The maintainers report ``mask_drop=0`` is sometimes better with
  newer encoders; zoo keeps p = 0.6 (paper fidelity) as the default.
* ``clam_sb_mil``: CLAM single-branch (Lu et al., Nat. Biomed. Eng. 2021, arXiv:2004.09666), with the
  attention-guided instance clustering loss.
* ``transmil``: TransMIL (Shao et al., NeurIPS 2021, arXiv:2106.00908): Nyström self-attention over the
  instances with a class token and the PPEG positional encoder.

None of these heads has pretrained weights (they are trained per dataset on frozen features).
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models import generate_default_cfgs

from .._registry import register_model

__all__ = [
    "MILHead",
    "MeanMIL",
    "MaxMIL",
    "GatedAttention",
    "ABMIL",
    "ACMIL",
    "CLAMSB",
    "TransMIL",
    "NystromAttention",
    "stochastic_topk_mask",
    "attention_diversity",
    "FAMILY",
]

FAMILY = dict(
    name="MIL heads",
    title="ACMIL: Attention-Challenging Multiple Instance Learning for Whole Slide Image Classification, "
    "and peer MIL heads (mean/max pooling, ABMIL, CLAM-SB, TransMIL)",
    paper_ids="arXiv:2311.07125 (ACMIL); arXiv:1802.04712 (ABMIL); arXiv:2004.09666 (CLAM); "
    "arXiv:2106.00908 (TransMIL)",
    origin_url="https://github.com/dazhangyu123/ACMIL",
    implementation="zoo (`zoo.heads.mil`), reimplemented from the papers and the ACMIL code description",
    citation="""@inproceedings{zhang2024acmil,
  title={Attention-Challenging Multiple Instance Learning for Whole Slide Image Classification},
  author={Zhang, Yunlong and Li, Honglin and Sun, Yunxuan and Zheng, Sunyi and Zhu, Chenglu and Yang, Lin},
  booktitle={ECCV},
  year={2024}
}""",
    reported_top1={},
    reported_source="ACMIL Table 1 (AUC / macro-F1 / accuracy on Camelyon16, BRACS, LBC) not verified; "
    "slide-level metrics, not ImageNet top-1",
    notes="MIL heads take frozen patch features of one slide (bag (N, D) or padded (B, N, D) with a mask) and "
    "return a dict with `logits` and `attention`; `head.loss(out, target)` gives the method's full loss. "
    "ACMIL defaults: M=5 branches, STKIM K=10, p=0.6 (training only); the ACMIL authors report p=0 is "
    "sometimes better with newer encoders. Metrics: AUC, **macro**-F1 and accuracy (the official code's "
    "later torchmetrics F1 defaulted to micro). No pretrained weights.",
)


def _cfg(paper_ids: str, license: str = "apache-2.0", **kwargs: Any) -> dict[str, Any]:
    # no weights: the cfg records provenance for cards (licence = zoo's reimplementation); input_size unused
    return dict(url="", num_classes=2, license=license, paper_ids=paper_ids, **kwargs)


default_cfgs = generate_default_cfgs(
    {
        "mean_mil": _cfg("arXiv:1802.04712"),
        "max_mil": _cfg("arXiv:1802.04712"),
        "abmil": _cfg("arXiv:1802.04712"),
        "acmil": _cfg("arXiv:2311.07125"),
        "clam_sb_mil": _cfg("arXiv:2004.09666"),
        "transmil": _cfg("arXiv:2106.00908"),
    }
)


# --------------------------------------------------------------------------------------------------
# shared pieces


def _as_bags(feats: torch.Tensor, mask: torch.Tensor | None, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalise input to ``(B, N, D)`` in the head's dtype and a boolean ``(B, N)`` mask."""
    if feats.ndim == 2:
        feats = feats.unsqueeze(0)
        if mask is not None and mask.ndim == 1:
            mask = mask.unsqueeze(0)
    if feats.ndim != 3:
        raise ValueError(f"MIL input must be a bag (N, D) or bags (B, N, D); got shape {tuple(feats.shape)}")
    B, N, _ = feats.shape
    if N == 0:
        raise ValueError("MIL input bag is empty (N = 0): a slide without tiles cannot be classified")
    if mask is None:
        mask = torch.ones(B, N, dtype=torch.bool, device=feats.device)
    else:
        if mask.shape != (B, N):
            raise ValueError(f"mask shape {tuple(mask.shape)} does not match bags {(B, N)}")
        mask = mask.to(device=feats.device, dtype=torch.bool)
    return feats.to(dtype), mask


def _check_in_dim(feats: torch.Tensor, in_dim: int, name: str) -> None:
    if feats.shape[-1] != in_dim:
        raise ValueError(
            f"{name} was built for {in_dim}-d instance features but got {feats.shape[-1]}-d ones: the features "
            f"come from a different backbone; rebuild the head with in_dim={feats.shape[-1]} or re-extract"
        )


def _masked_softmax(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Softmax over the last axis (instances) with padding excluded; computed in float32.

    Args:
        logits: ``(B, K, N)``; mask: ``(B, N)`` True = real.
    """
    logits = logits.float().masked_fill(~mask[:, None, :], float("-inf"))
    return torch.softmax(logits, dim=-1)


def _check_nonempty(mask: torch.Tensor) -> None:
    if not bool(mask.any(dim=1).all()):
        bad = (~mask.any(dim=1)).nonzero().flatten().tolist()
        raise ValueError(f"bag(s) {bad} of the batch have no real instance (mask all False)")


class MILHead(nn.Module):
    """Base class: input normalisation and the default loss (CE on ``logits`` + every ``aux_losses`` term)."""

    in_dim: int
    num_classes: int

    def _prepare(self, feats: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        feats, mask = _as_bags(feats, mask, next(self.parameters()).dtype)
        _check_in_dim(feats, self.in_dim, type(self).__name__)
        _check_nonempty(mask)
        return feats, mask

    def loss(self, out: dict[str, Any], target: torch.Tensor) -> dict[str, torch.Tensor]:
        """``{'loss': total, 'ce': slide CE, <aux term>: value, ...}`` for ``target`` ``(B,)``."""
        terms = {"ce": F.cross_entropy(out["logits"].float(), target)}
        terms.update(out.get("aux_losses", {}))
        terms["loss"] = sum(terms.values())
        return terms

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the slide classifier(s) for ``num_classes`` classes."""
        raise NotImplementedError


class GatedAttention(nn.Module):
    """Gated attention scores ``W(tanh(V x) * sigmoid(U x))`` (Ilse et al. 2018): ``(B, N, D) -> (B, K, N)``.

    Raw logits, not normalised; K = number of attention branches.
    """

    def __init__(self, dim: int, hidden_dim: int = 128, num_branches: int = 1, dropout: float = 0.0) -> None:
        super().__init__()
        self.attention_v = nn.Linear(dim, hidden_dim)
        self.attention_u = nn.Linear(dim, hidden_dim)
        self.drop = nn.Dropout(dropout)
        self.attention_w = nn.Linear(hidden_dim, num_branches)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gated = torch.tanh(self.attention_v(x)) * torch.sigmoid(self.attention_u(x))
        return self.attention_w(self.drop(gated)).transpose(1, 2)


def _reduction(in_dim: int, dim: int, bias: bool = False) -> nn.Sequential:
    # ACMIL's DimReduction: Linear without bias + ReLU
    return nn.Sequential(nn.Linear(in_dim, dim, bias=bias), nn.ReLU(inplace=True))


# --------------------------------------------------------------------------------------------------
# pooling baselines


class MeanMIL(MILHead):
    """Mean pooling of reduced instance features, then a linear classifier.

    ``(B, N, D) -> logits (B, C)``; ``attention`` ``(B, 1, N)`` is uniform over the real instances.
    """

    def __init__(self, in_dim: int = 512, num_classes: int = 2, dim: int = 256, dropout: float = 0.0) -> None:
        super().__init__()
        self.in_dim, self.num_classes, self.dim = in_dim, num_classes, dim
        self.reduce = _reduction(in_dim, dim)
        self.drop = nn.Dropout(dropout)
        self.classifier = nn.Linear(dim, num_classes)

    def forward(self, feats: torch.Tensor, mask: torch.Tensor | None = None) -> dict[str, Any]:
        x, mask = self._prepare(feats, mask)
        h = self.reduce(x)  # (B, N, dim)
        weights = mask.float() / mask.sum(1, keepdim=True).float()  # (B, N)
        z = torch.einsum("bn,bnd->bd", weights.to(h.dtype), h)
        return {"logits": self.classifier(self.drop(z)), "attention": weights[:, None, :]}

    def reset_classifier(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.classifier = nn.Linear(self.dim, num_classes)


class MaxMIL(MILHead):
    """Instance classifier, bag logit = max over the real instances per class (mi-Net style).

    ``attention`` ``(B, 1, N)``: softmax over instances of the instance logits of the predicted class, so
    the heatmap shows which tiles drive the decision.
    """

    def __init__(self, in_dim: int = 512, num_classes: int = 2, dim: int = 256, dropout: float = 0.0) -> None:
        super().__init__()
        self.in_dim, self.num_classes, self.dim = in_dim, num_classes, dim
        self.reduce = _reduction(in_dim, dim)
        self.drop = nn.Dropout(dropout)
        self.classifier = nn.Linear(dim, num_classes)

    def forward(self, feats: torch.Tensor, mask: torch.Tensor | None = None) -> dict[str, Any]:
        x, mask = self._prepare(feats, mask)
        inst = self.classifier(self.drop(self.reduce(x)))  # (B, N, C)
        inst = inst.masked_fill(~mask[..., None], float("-inf"))
        logits = inst.max(dim=1).values  # (B, C)
        pred = logits.argmax(-1)
        top = inst.gather(2, pred[:, None, None].expand(-1, inst.shape[1], 1)).squeeze(-1)  # (B, N)
        attention = _masked_softmax(top[:, None, :], mask)
        return {"logits": logits, "attention": attention, "instance_logits": inst}

    def reset_classifier(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.classifier = nn.Linear(self.dim, num_classes)


# --------------------------------------------------------------------------------------------------
# ABMIL and ACMIL


class ABMIL(MILHead):
    """Gated attention MIL (Ilse et al. 2018) in ACMIL's baseline form.

    DimReduction ``Linear(D -> dim, no bias) + ReLU``; gated attention ``dim -> attn_dim -> 1``; softmax over
    instances; attention-weighted sum; ``Linear(dim -> C)``. Equal to ``ACMIL(num_branches=1, mask_k=0)``
    (the ACMIL script's own ABMIL baseline) with the same weights.

    Returns ``logits (B, C)``, ``attention (B, 1, N)``, ``attention_logits (B, 1, N)``.
    """

    def __init__(
        self, in_dim: int = 512, num_classes: int = 2, dim: int = 256, attn_dim: int = 128, dropout: float = 0.0
    ) -> None:
        super().__init__()
        self.in_dim, self.num_classes, self.dim = in_dim, num_classes, dim
        self.reduce = _reduction(in_dim, dim)
        self.attention = GatedAttention(dim, attn_dim, 1, dropout)
        self.classifier = nn.Linear(dim, num_classes)

    def forward(self, feats: torch.Tensor, mask: torch.Tensor | None = None) -> dict[str, Any]:
        x, mask = self._prepare(feats, mask)
        h = self.reduce(x)  # (B, N, dim)
        a_logits = self.attention(h)  # (B, 1, N)
        a = _masked_softmax(a_logits, mask)
        z = torch.bmm(a.to(h.dtype), h).squeeze(1)  # (B, dim)
        return {"logits": self.classifier(z), "attention": a, "attention_logits": a_logits}

    def reset_classifier(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.classifier = nn.Linear(self.dim, num_classes)


def stochastic_topk_mask(
    logits: torch.Tensor, mask: torch.Tensor, k: int, drop: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Stochastic Top-K Instance Masking (ACMIL's STKIM): boolean ``(B, M, N)``, True = hide this instance.

    Per bag and branch, take the ``k`` largest logits among the real instances and choose ``floor(k * drop)``
    of them uniformly at random. With fewer than ``k`` real instances, ``k`` shrinks to their number (the
    official code clips ``k`` to N).

    Args:
        logits: ``(B, M, N)`` raw attention logits.
        mask: ``(B, N)`` True = real instance.
    """
    B, M, N = logits.shape
    k_eff = min(k, N)
    n_hide = int(k_eff * drop)
    hide = torch.zeros(B, M, N, dtype=torch.bool, device=logits.device)
    if n_hide == 0:
        return hide
    # padding can never be in the top-K of a bag that has >= k real instances
    scores = logits.detach().float().masked_fill(~mask[:, None, :], float("-inf"))
    top_idx = scores.topk(k_eff, dim=-1).indices  # (B, M, k_eff)
    # random subset of size n_hide: the first n_hide of a random permutation of the k_eff slots
    # (noise on the logits' device: ACMIL PR #14)
    noise = torch.rand(B, M, k_eff, device=logits.device, generator=generator)
    chosen = top_idx.gather(-1, noise.argsort(dim=-1)[..., :n_hide])
    hide.scatter_(-1, chosen, True)
    return hide & mask[:, None, :]


def attention_diversity(attention: torch.Tensor) -> torch.Tensor:
    """ACMIL's diversity loss: mean over branch pairs i < j of cos(attention_i, attention_j), mean over bags.

    Args:
        attention: ``(B, M, N)`` softmaxed branch attentions (zeros on padding). Returns a scalar; 0 if M = 1.
    """
    B, M, _ = attention.shape
    if M < 2:
        return attention.new_zeros(())
    unit = F.normalize(attention.float(), dim=-1)
    sim = unit @ unit.transpose(1, 2)  # (B, M, M)
    i, j = torch.triu_indices(M, M, offset=1, device=attention.device)
    return sim[:, i, j].mean()


class ACMIL(MILHead):
    """Attention-Challenging MIL, gated variant (``ACMIL_GA``; Zhang et al., ECCV 2024).

    1. DimReduction ``Linear(D -> dim, no bias) + ReLU``: ``(B, N, D) -> (B, N, dim)``.
    2. Gated attention with M outputs: raw logits ``A (B, M, N)``.
    3. STKIM (training only, ``mask_k > 0``): per branch, ``floor(mask_k * mask_drop)`` of the top
       ``mask_k`` logits, chosen at random, are set to -1e9 before the softmax.
    4. Per-branch pooling ``Z = softmax_N(A) @ h (B, M, dim)``; branch m has its own ``Linear(dim -> C)``
       -> ``aux_logits (B, M, C)``.
    5. Slide pooling: ``a_bar = mean_m softmax_N(A_m)`` (masked attentions in training), ``z = a_bar @ h``,
       slide ``Linear(dim -> C)`` -> ``logits (B, C)``, the only output used for evaluation.

    Outputs: ``logits``, ``aux_logits``, ``attention (B, M, N)`` (branch softmaxes), ``slide_attention
    (B, N)``, ``attention_logits (B, M, N)`` (STKIM-masked in training), ``aux_losses = {'diversity'}``.
    ``loss``: slide CE + CE of every branch against the bag label (only when M > 1) + diversity, weights 1.

    Feature sizes in the paper: ResNet-18 512 -> 256, ViT-S 384 -> 128, CLIP-L 768 -> 384, UNI 1024 -> 512,
    GigaPath 1536 -> 768 (``dim`` defaults to ``in_dim // 2``).
    """

    def __init__(
        self,
        in_dim: int = 512,
        num_classes: int = 2,
        dim: int | None = None,
        attn_dim: int = 128,
        num_branches: int = 5,
        mask_k: int = 10,
        mask_drop: float = 0.6,
    ) -> None:
        super().__init__()
        if not 0.0 <= mask_drop <= 1.0:
            raise ValueError(f"mask_drop must be in [0, 1]; got {mask_drop}")
        dim = dim or max(1, in_dim // 2)
        self.in_dim, self.num_classes, self.dim = in_dim, num_classes, dim
        self.num_branches, self.mask_k, self.mask_drop = num_branches, mask_k, mask_drop
        self.reduce = _reduction(in_dim, dim)
        self.attention = GatedAttention(dim, attn_dim, num_branches)
        self.branch_classifiers = nn.ModuleList([nn.Linear(dim, num_classes) for _ in range(num_branches)])
        self.classifier = nn.Linear(dim, num_classes)

    def forward(self, feats: torch.Tensor, mask: torch.Tensor | None = None) -> dict[str, Any]:
        x, mask = self._prepare(feats, mask)
        h = self.reduce(x)  # (B, N, dim)
        a_logits = self.attention(h)  # (B, M, N)
        if self.training and self.mask_k > 0:
            hide = stochastic_topk_mask(a_logits, mask, self.mask_k, self.mask_drop)
            # -1e9, not -inf: a branch whose every real instance is hidden still normalises (uniformly)
            a_logits = a_logits.float().masked_fill(hide, -1e9)
        a = _masked_softmax(a_logits, mask)  # (B, M, N)
        z_branch = torch.bmm(a.to(h.dtype), h)  # (B, M, dim)
        aux_logits = torch.stack([clf(z_branch[:, m]) for m, clf in enumerate(self.branch_classifiers)], dim=1)
        slide_attention = a.mean(dim=1)  # (B, N)
        z = torch.bmm(slide_attention[:, None, :].to(h.dtype), h).squeeze(1)  # (B, dim)
        return {
            "logits": self.classifier(z),
            "aux_logits": aux_logits,
            "attention": a,
            "slide_attention": slide_attention,
            "attention_logits": a_logits,
            "aux_losses": {"diversity": attention_diversity(a)},
        }

    def loss(self, out: dict[str, Any], target: torch.Tensor) -> dict[str, torch.Tensor]:
        """slide CE + branch CE (M > 1; each branch against the bag label) + diversity; all weights 1."""
        terms = {"ce": F.cross_entropy(out["logits"].float(), target)}
        if self.num_branches > 1:
            aux = out["aux_logits"].float()  # (B, M, C)
            terms["branch_ce"] = F.cross_entropy(aux.flatten(0, 1), target.repeat_interleave(aux.shape[1]))
        terms["diversity"] = out["aux_losses"]["diversity"]
        terms["loss"] = sum(terms.values())
        return terms

    def reset_classifier(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.classifier = nn.Linear(self.dim, num_classes)
        self.branch_classifiers = nn.ModuleList([nn.Linear(self.dim, num_classes) for _ in range(self.num_branches)])


# --------------------------------------------------------------------------------------------------
# CLAM-SB


class CLAMSB(MILHead):
    """CLAM single-branch (Lu et al. 2021): gated attention MIL + attention-guided instance clustering.

    ``fc: Linear(D -> dim) + ReLU + Dropout``; gated attention ``dim -> attn_dim -> 1``; bag classifier
    ``Linear(dim -> C)``; one binary instance classifier per class. In ``loss`` (training), for the bag's
    class the ``k_sample`` most attended instances are pseudo-labelled positive and the ``k_sample`` least
    attended negative; with ``subtyping=True`` the most attended instances are also negatives for every
    other class. ``loss = bag_weight * CE + (1 - bag_weight) * instance CE``.

    Outputs: ``logits (B, C)``, ``attention (B, 1, N)``, ``instance_feats (B, N, dim)`` (used by ``loss``).
    """

    def __init__(
        self,
        in_dim: int = 512,
        num_classes: int = 2,
        dim: int = 512,
        attn_dim: int = 256,
        dropout: float = 0.25,
        k_sample: int = 8,
        bag_weight: float = 0.7,
        subtyping: bool = False,
    ) -> None:
        super().__init__()
        self.in_dim, self.num_classes, self.dim = in_dim, num_classes, dim
        self.k_sample, self.bag_weight, self.subtyping = k_sample, bag_weight, subtyping
        self.fc = nn.Sequential(nn.Linear(in_dim, dim), nn.ReLU(inplace=True), nn.Dropout(dropout))
        self.attention = GatedAttention(dim, attn_dim, 1, dropout)
        self.classifier = nn.Linear(dim, num_classes)
        self.instance_classifiers = nn.ModuleList([nn.Linear(dim, 2) for _ in range(num_classes)])

    def forward(self, feats: torch.Tensor, mask: torch.Tensor | None = None) -> dict[str, Any]:
        x, mask = self._prepare(feats, mask)
        h = self.fc(x)  # (B, N, dim)
        a_logits = self.attention(h)  # (B, 1, N)
        a = _masked_softmax(a_logits, mask)
        z = torch.bmm(a.to(h.dtype), h).squeeze(1)
        return {"logits": self.classifier(z), "attention": a, "instance_feats": h, "mask": mask}

    def _instance_loss(self, h: torch.Tensor, a: torch.Tensor, target: int) -> torch.Tensor:
        """Instance clustering CE for one bag: ``h (N, dim)`` real instances, ``a (N,)`` attention."""
        k = min(self.k_sample, h.shape[0] // 2)
        if k == 0:
            return h.new_zeros(()).float()
        order = a.argsort(descending=True)
        top, bottom = order[:k], order[-k:]
        losses = []
        for c, clf in enumerate(self.instance_classifiers):
            if c == target:
                inst = torch.cat([h[top], h[bottom]])
                labels = torch.cat([torch.ones(k), torch.zeros(k)]).long().to(h.device)
            elif self.subtyping:
                inst, labels = h[top], torch.zeros(k, dtype=torch.long, device=h.device)
            else:
                continue
            losses.append(F.cross_entropy(clf(inst).float(), labels))
        return torch.stack(losses).mean()

    def loss(self, out: dict[str, Any], target: torch.Tensor) -> dict[str, torch.Tensor]:
        ce = F.cross_entropy(out["logits"].float(), target)
        inst = torch.stack(
            [
                self._instance_loss(out["instance_feats"][b][m], out["attention"][b, 0][m], int(target[b]))
                for b, m in enumerate(out["mask"])
            ]
        ).mean()
        return {"ce": ce, "instance": inst, "loss": self.bag_weight * ce + (1 - self.bag_weight) * inst}

    def reset_classifier(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.classifier = nn.Linear(self.dim, num_classes)
        self.instance_classifiers = nn.ModuleList([nn.Linear(self.dim, 2) for _ in range(num_classes)])


# --------------------------------------------------------------------------------------------------
# TransMIL


class NystromAttention(nn.Module):
    """Multi-head Nyström self-attention (Xiong et al., AAAI 2021): O(N m) for m landmarks.

    ``(B, N, dim) -> (B, N, dim)``. Landmarks are segment means of queries and keys (the sequence is
    front-padded with zeros to a multiple of ``num_landmarks``; bags shorter than that use N landmarks); the
    pseudo-inverse of the landmark kernel is approximated by ``pinv_iters`` Newton-Schulz iterations; a
    depthwise convolution over the values (kernel ``residual_kernel``) is added as the residual, as in the
    Nystromformer.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        head_dim: int | None = None,
        num_landmarks: int = 256,
        pinv_iters: int = 6,
        residual_kernel: int = 33,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        head_dim = head_dim or dim // num_heads
        self.num_heads, self.head_dim = num_heads, head_dim
        self.num_landmarks, self.pinv_iters = num_landmarks, pinv_iters
        self.scale = head_dim**-0.5
        self.qkv = nn.Linear(dim, 3 * num_heads * head_dim, bias=False)
        self.proj = nn.Sequential(nn.Linear(num_heads * head_dim, dim), nn.Dropout(dropout))
        pad = residual_kernel // 2
        self.residual = nn.Conv2d(num_heads, num_heads, (residual_kernel, 1), padding=(pad, 0), groups=num_heads)

    @staticmethod
    def _pinv(x: torch.Tensor, iters: int) -> torch.Tensor:
        """Iterative Moore–Penrose pseudo-inverse of a batch of row-stochastic matrices ``(..., m, m)``."""
        abs_x = x.abs()
        scale = abs_x.sum(-1).amax(-1, keepdim=True)[..., None] * abs_x.sum(-2).amax(-1, keepdim=True)[..., None]
        z = x.transpose(-1, -2) / scale
        eye = torch.eye(x.shape[-1], device=x.device, dtype=x.dtype)
        for _ in range(iters):
            xz = x @ z
            z = 0.25 * z @ (13 * eye - xz @ (15 * eye - xz @ (7 * eye - xz)))
        return z

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, _ = x.shape
        m = min(self.num_landmarks, N)  # short bags: one landmark per instance, no padding work
        pad = (m - N % m) % m
        if pad:
            x = F.pad(x, (0, 0, pad, 0))  # front padding, as the Nyströmformer does
        q, k, v = self.qkv(x).reshape(B, -1, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q = q * self.scale
        seg = q.shape[2] // m
        # landmark means over the real (unpadded) instances of each segment
        q_l = q.reshape(B, self.num_heads, m, seg, self.head_dim).sum(3) / seg
        k_l = k.reshape(B, self.num_heads, m, seg, self.head_dim).sum(3) / seg
        kernel_1 = torch.softmax(q @ k_l.transpose(-1, -2), dim=-1)  # (B, H, N', m)
        kernel_2 = torch.softmax(q_l @ k_l.transpose(-1, -2), dim=-1)  # (B, H, m, m)
        kernel_3 = torch.softmax(q_l @ k.transpose(-1, -2), dim=-1)  # (B, H, m, N')
        out = kernel_1 @ self._pinv(kernel_2, self.pinv_iters) @ (kernel_3 @ v)
        out = out + self.residual(v)
        out = out.transpose(1, 2).reshape(B, -1, self.num_heads * self.head_dim)
        return self.proj(out)[:, -N:]


class _TransLayer(nn.Module):
    def __init__(self, dim: int, num_landmarks: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.attn = NystromAttention(dim, num_heads=8, num_landmarks=num_landmarks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.attn(self.norm(x))


class _PPEG(nn.Module):
    """Pyramid position encoding generator: depthwise 7/5/3 convolutions over the square token grid."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.convs = nn.ModuleList([nn.Conv2d(dim, dim, k, padding=k // 2, groups=dim) for k in (7, 5, 3)])

    def forward(self, x: torch.Tensor, side: int) -> torch.Tensor:
        cls_token, tokens = x[:, :1], x[:, 1:]
        grid = tokens.transpose(1, 2).reshape(x.shape[0], -1, side, side)
        grid = grid + sum(conv(grid) for conv in self.convs)
        return torch.cat([cls_token, grid.flatten(2).transpose(1, 2)], dim=1)


class TransMIL(MILHead):
    """TransMIL (Shao et al. 2021): correlated MIL with Nyström self-attention and PPEG.

    ``fc: Linear(D -> dim) + ReLU``; the N instances are padded to the next square S^2 by repeating the
    first ones; a class token is prepended; TransLayer -> PPEG -> TransLayer -> LayerNorm; the class token
    goes through ``Linear(dim -> C)``. Padded batches are run bag by bag (exact; MIL batches are small).

    ``attention (B, 1, N)``: the class token's softmax attention over the instances in the last layer,
    averaged over heads (exact for that row; the layer itself uses the Nyström approximation).
    """

    def __init__(self, in_dim: int = 512, num_classes: int = 2, dim: int = 512, num_landmarks: int | None = None):
        super().__init__()
        self.in_dim, self.num_classes, self.dim = in_dim, num_classes, dim
        self.fc = nn.Sequential(nn.Linear(in_dim, dim), nn.ReLU(inplace=True))
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        landmarks = num_landmarks or dim // 2  # TransMIL: dim // 2 landmarks
        self.layer1 = _TransLayer(dim, landmarks)
        self.ppeg = _PPEG(dim)
        self.layer2 = _TransLayer(dim, landmarks)
        self.norm = nn.LayerNorm(dim)
        self.classifier = nn.Linear(dim, num_classes)

    def _one_bag(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``x (1, n, D)`` -> logits ``(1, C)``, attention ``(1, 1, n)``."""
        n = x.shape[1]
        h = self.fc(x)
        side = math.ceil(math.sqrt(n))
        extra = side * side - n
        if extra:
            h = torch.cat([h, h[:, :extra].repeat(1, math.ceil(extra / n), 1)[:, :extra]], dim=1)
        h = torch.cat([self.cls_token.expand(1, -1, -1).to(h.dtype), h], dim=1)
        h = self.layer2(self.ppeg(self.layer1(h), side))
        # the class token's attention row of layer 2 (recomputed exactly: one query, cheap)
        attn = self.layer2.attn
        qkv = attn.qkv(self.layer2.norm(h)).reshape(1, -1, 3, attn.num_heads, attn.head_dim)
        q_cls, k = qkv[:, :1, 0].transpose(1, 2), qkv[:, 1 : n + 1, 1].transpose(1, 2)
        cls_attn = torch.softmax((q_cls * attn.scale) @ k.transpose(-1, -2), dim=-1).mean(1)  # (1, 1, n)
        return self.classifier(self.norm(h)[:, 0]), cls_attn.float()

    def forward(self, feats: torch.Tensor, mask: torch.Tensor | None = None) -> dict[str, Any]:
        x, mask = self._prepare(feats, mask)
        B, N, _ = x.shape
        logits, attention = [], x.new_zeros(B, 1, N, dtype=torch.float32)
        for b in range(B):
            real = mask[b].nonzero().flatten()
            bag_logits, bag_attn = self._one_bag(x[b : b + 1, real])
            logits.append(bag_logits)
            attention[b, :, real] = bag_attn[0]
        return {"logits": torch.cat(logits), "attention": attention}

    def reset_classifier(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.classifier = nn.Linear(self.dim, num_classes)


# --------------------------------------------------------------------------------------------------
# registry


def _create_mil(cls: type[MILHead], pretrained: bool = False, **kwargs: Any) -> MILHead:
    """Build a head; ``pretrained_cfg`` is attached for tools; ``device=`` builds on that device (``meta``)."""
    pretrained_cfg = kwargs.pop("pretrained_cfg", None)
    kwargs.pop("pretrained_cfg_overlay", None)
    kwargs.pop("cache_dir", None)
    device = kwargs.pop("device", None)
    if pretrained:
        raise RuntimeError(
            f"{cls.__name__} has no pretrained weights: MIL heads are trained per dataset on frozen features "
            f"(`zoo mil train`); build with pretrained=False and load your own checkpoint with checkpoint_path="
        )
    with torch.device(device) if device is not None else nullcontext():
        model = cls(**kwargs)
    if pretrained_cfg is not None:
        model.pretrained_cfg = pretrained_cfg.to_dict() if hasattr(pretrained_cfg, "to_dict") else pretrained_cfg
    return model


@register_model(kind="mil_head")
def mean_mil(pretrained: bool = False, **kwargs: Any) -> MeanMIL:
    """Mean pooling MIL baseline."""
    return _create_mil(MeanMIL, pretrained, **kwargs)


@register_model(kind="mil_head")
def max_mil(pretrained: bool = False, **kwargs: Any) -> MaxMIL:
    """Max pooling (instance classifier) MIL baseline."""
    return _create_mil(MaxMIL, pretrained, **kwargs)


@register_model(kind="mil_head")
def abmil(pretrained: bool = False, **kwargs: Any) -> ABMIL:
    """Gated attention MIL (Ilse et al. 2018), ACMIL's baseline form."""
    return _create_mil(ABMIL, pretrained, **kwargs)


@register_model(kind="mil_head")
def acmil(pretrained: bool = False, **kwargs: Any) -> ACMIL:
    """ACMIL (gated, M=5, STKIM K=10 p=0.6), ECCV 2024."""
    return _create_mil(ACMIL, pretrained, **kwargs)


@register_model(kind="mil_head")
def clam_sb_mil(pretrained: bool = False, **kwargs: Any) -> CLAMSB:
    """CLAM single-branch with instance clustering loss."""
    return _create_mil(CLAMSB, pretrained, **kwargs)


@register_model(kind="mil_head")
def transmil(pretrained: bool = False, **kwargs: Any) -> TransMIL:
    """TransMIL (Nyström attention + PPEG)."""
    return _create_mil(TransMIL, pretrained, **kwargs)
