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

Heads (``zoo.list_models('*mil*')``); each default reproduces the authors' code named in ``FAMILY['references']``
(eval-mode outputs equal within 1e-5 on the same weights), every kept difference is a keyword listed in
``FAMILY['deviations']``:

* ``mean_mil``, ``max_mil``: instance-pooling baselines.
* ``abmil``: gated attention MIL (Ilse, Tomczak, Welling, ICML 2018, arXiv:1802.04712) in the form of the ACMIL
  authors' baseline (``ABMIL`` in ``dazhangyu123/ACMIL`` ``architecture/transformer.py``).
* ``acmil``: Attention-Challenging MIL, gated variant ``ACMIL_GA`` (Zhang et al., ECCV 2024,
  arXiv:2311.07125): DimReduction (no bias) + ReLU, M = 5 gated-attention branches, Stochastic Top-K
  Instance Masking (K = 10, p = 0.6, training only), per-branch classifiers, slide classifier on the mean of
  the branch softmaxes; loss = slide CE + branch CE (M > 1) + diversity (mean pairwise cosine similarity of
  the branch attentions). The maintainers report ``mask_drop=0`` is sometimes better with newer encoders;
  zoo keeps p = 0.6 (the README's ACMIL command) as the default.
* ``clam_sb_mil``, ``clam_mb_mil``: CLAM single- and multi-branch (Lu et al., Nat. Biomed. Eng. 2021,
  arXiv:2004.09666, ``mahmoodlab/CLAM`` ``CLAM_SB`` / ``CLAM_MB``), with the attention-guided instance
  clustering loss.
* ``transmil``: TransMIL (Shao et al., NeurIPS 2021, arXiv:2106.00908): Nyström self-attention over the
  instances with a class token and the PPEG positional encoder.

Authors' checkpoints load as they are saved (``checkpoint_filter_fn`` maps their keys; zoo's own layout passes
unchanged): ``zoo.create_model(name, checkpoint_path=F, in_dim=..., num_classes=...)`` or
``zoo.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=F), ...)``. The only published
trained weights are CLAM's demo checkpoint (``clam_sb_mil.nsclc_demo``); the other heads are trained per
dataset on frozen features (``zoo mil train``).
"""

from __future__ import annotations

import math
import re
from contextlib import nullcontext
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models import generate_default_cfgs

from .._io import register_plain_data_class
from .._registry import register_model

# the authors' training scripts pickle their config next to the weights: plain attribute bags, loaded as such
register_plain_data_class("utils.utils.Struct")  # ACMIL's save_model
register_plain_data_class("addict.addict.Dict", dict)  # TransMIL's Lightning hyper_parameters

__all__ = [
    "MILHead",
    "MeanMIL",
    "MaxMIL",
    "GatedAttention",
    "ABMIL",
    "ACMIL",
    "CLAMSB",
    "CLAMMB",
    "TransMIL",
    "NystromAttention",
    "stochastic_topk_mask",
    "attention_diversity",
    "acmil_inner_dim",
    "checkpoint_filter_fn",
    "FAMILY",
]

_ACMIL_REF = "dazhangyu123/ACMIL@e53d19c81f3892256d41962ffc4352cc91a4f834"
_CLAM_REF = "mahmoodlab/CLAM@53e2409d4a8189c682c173382964a85f114f923c"
_TRANSMIL_REF = "szc19990412/TransMIL@9d6aee57c7c72375fb9132dc58cd8c9b0f0a949c"

FAMILY = dict(
    name="MIL heads",
    title="ACMIL: Attention-Challenging Multiple Instance Learning for Whole Slide Image Classification, "
    "and peer MIL heads (mean/max pooling, ABMIL, CLAM-SB, CLAM-MB, TransMIL)",
    paper_ids="arXiv:2311.07125 (ACMIL); arXiv:1802.04712 (ABMIL); arXiv:2004.09666 (CLAM); "
    "arXiv:2106.00908 (TransMIL)",
    origin_url="https://github.com/dazhangyu123/ACMIL",
    implementation="zoo (`zoo.heads.mil`), reimplemented from the papers and checked against the authors' code",
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
    "later torchmetrics F1 defaulted to micro). Authors' checkpoints load unchanged with "
    "`zoo.create_model(name, checkpoint_path='ckpt.pth', in_dim=D, num_classes=C)` (ACMIL's `{'model': ...}` "
    "files, CLAM's bare state dicts, TransMIL's Lightning `state_dict` with its `model.` prefix). Published "
    "trained weights: only CLAM's heatmap demo checkpoint (`clam_sb_mil.nsclc_demo`); the ACMIL and TransMIL "
    "authors published features (ACMIL) but no trained heads.",
    references={
        "abmil": f"{_ACMIL_REF}, architecture/transformer.py `ABMIL` (the `--arch abmil` baseline of "
        "Step3_WSI_classification.py; DimReduction / Attention_Gated / Classifier_1fc); also loads the README's "
        "ABMIL baseline (`ACMIL_GA` with n_token=1, its unused branch classifier dropped); "
        "parity 1e-5 (max abs logit difference, eval) on bags of 1,000 instances, 512-d and 384-d features",
        "acmil": f"{_ACMIL_REF}, architecture/transformer.py `ACMIL_GA` (n_token=5, n_masked_patch=10, "
        "mask_drop=0.6, the README's ACMIL command); parity 1e-5 on slide and branch logits (eval) and on "
        "training-mode outputs under the same seed (STKIM draws the same random numbers), 512-d -> 256 and "
        "384-d -> 128 features",
        "clam_sb_mil": f"{_CLAM_REF}, models/model_clam.py `CLAM_SB` (gate=True, size_arg='small', "
        "embed_dim=1024; dropout 0.25 and k_sample=8 as main.py's defaults); parity 1e-5 on logits and raw "
        "attention (eval), and on the instance loss for a given label; the authors' demo checkpoint "
        "(heatmaps/demo/ckpts/s_0_checkpoint.pt) loads unchanged",
        "clam_mb_mil": f"{_CLAM_REF}, models/model_clam.py `CLAM_MB` (gate=True, size_arg='small', "
        "embed_dim=1024); parity 1e-5 on logits, per-class attention (eval) and the instance loss",
        "transmil": f"{_TRANSMIL_REF}, models/TransMIL.py `TransMIL` (in 1024, width 512, 8 heads, 256 "
        "landmarks) with lucidrains/nystrom-attention 0.0.12 (@3a06553; the forward of 0.0.11-0.0.14 is the "
        "same, 0.0.12 is what ACMIL's baselines use); parity 1e-5 on logits (eval) for bags of 100 and "
        "1,000 instances. `legacy_nystrom=True` reproduces nystrom-attention 0.0.9, the version TransMIL's "
        "requirements.txt pins, which after front-padding kept the first N outputs instead of the last N "
        "(fixed upstream in 0.0.10)",
    },
    deviations={
        "transmil": {
            "exact_short_bags": "False (default) pads bags shorter than `num_landmarks` with zero tokens up to "
            "one landmark per token, as nystrom-attention does; True uses one landmark per real token instead "
            "(no zero tokens: attention exact up to the pseudo-inverse; logits differ from the reference)",
            "legacy_nystrom": "False (default) = nystrom-attention >= 0.0.10; True = 0.0.9 (TransMIL's pin), "
            "for checkpoints trained with it",
        },
    },
)

# ACMIL's table of feature width -> inner width (Step3_WSI_classification_ACMIL.py, `--pretrain`): ResNet-18
# and CLIP-B 512 -> 256, Lunit DINO ViT-S 384 -> 128, CLIP-L 768 -> 384, UNI 1024 -> 512, GigaPath 1536 -> 768
_ACMIL_INNER_DIM = {384: 128, 512: 256, 768: 384, 1024: 512, 1536: 768}


def acmil_inner_dim(in_dim: int) -> int:
    """The ACMIL authors' inner width for ``in_dim``-d features (their table; half the width elsewhere)."""
    return _ACMIL_INNER_DIM.get(in_dim, max(1, in_dim // 2))


def _cfg(paper_ids: str, license: str = "apache-2.0", **kwargs: Any) -> dict[str, Any]:
    # the cfg records provenance for cards (licence = zoo's reimplementation, or the weights'); input_size unused
    return {"url": "", "num_classes": 2, "license": license, "paper_ids": paper_ids, **kwargs}


default_cfgs = generate_default_cfgs(
    {
        "mean_mil": _cfg("arXiv:1802.04712"),
        "max_mil": _cfg("arXiv:1802.04712"),
        "abmil": _cfg("arXiv:1802.04712", origin_url="https://github.com/dazhangyu123/ACMIL"),
        "acmil": _cfg("arXiv:2311.07125", origin_url="https://github.com/dazhangyu123/ACMIL"),
        # the CLAM authors' heatmap demo checkpoint: CLAM-SB small on 1024-d ResNet-50 (truncated) features,
        # LUAD = 0 / LSCC = 1 (heatmaps/configs/config_template.yaml); the training set is not stated
        "clam_sb_mil.nsclc_demo": _cfg(
            "arXiv:2004.09666",
            license="gpl-3.0",
            url="https://github.com/mahmoodlab/CLAM/raw/53e2409d4a8189c682c173382964a85f114f923c/heatmaps/demo/"
            "ckpts/s_0_checkpoint.pt",
            label_names=("LUAD", "LSCC"),
            origin_url="https://github.com/mahmoodlab/CLAM",
            notes="CLAM authors' heatmap demo checkpoint (GPLv3, non-commercial academic use), 1024-d "
            "ResNet-50-trunc features; sha256 3baf3cf79591e144bc46a9b756dd29b013d68ce98772a820461cc6153f3b5f66",
        ),
        "clam_mb_mil": _cfg("arXiv:2004.09666", origin_url="https://github.com/mahmoodlab/CLAM"),
        "transmil": _cfg("arXiv:2106.00908", origin_url="https://github.com/szc19990412/TransMIL"),
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

    Raw logits, not normalised; K = number of attention branches. ``dropout`` acts on the tanh and the sigmoid
    branch separately, as in CLAM's ``Attn_Net_Gated`` (ABMIL and ACMIL use none).
    """

    def __init__(self, dim: int, hidden_dim: int = 128, num_branches: int = 1, dropout: float = 0.0) -> None:
        super().__init__()
        self.attention_v = nn.Linear(dim, hidden_dim)
        self.attention_u = nn.Linear(dim, hidden_dim)
        self.drop = nn.Dropout(dropout)
        self.attention_w = nn.Linear(hidden_dim, num_branches)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gated = self.drop(torch.tanh(self.attention_v(x))) * self.drop(torch.sigmoid(self.attention_u(x)))
        return self.attention_w(gated).transpose(1, 2)


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
    """Gated attention MIL (Ilse et al. 2018) in ACMIL's baseline form (``ABMIL`` of the ACMIL code).

    DimReduction ``Linear(D -> dim, no bias) + ReLU``; gated attention ``dim -> attn_dim -> 1``; softmax over
    instances; attention-weighted sum; ``Linear(dim -> C)``. Equal to ``ACMIL(num_branches=1, mask_k=0)``
    (the ACMIL script's own ABMIL baseline) with the same weights.

    Args:
        dim: inner width; default: the ACMIL authors' width for ``in_dim`` (``acmil_inner_dim``: 512 -> 256,
            384 -> 128, 768 -> 384, 1024 -> 512, 1536 -> 768; otherwise ``in_dim // 2``).

    Returns ``logits (B, C)``, ``attention (B, 1, N)``, ``attention_logits (B, 1, N)``.
    """

    def __init__(
        self,
        in_dim: int = 512,
        num_classes: int = 2,
        dim: int | None = None,
        attn_dim: int = 128,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        dim = dim or acmil_inner_dim(in_dim)
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

    Args:
        dim: inner width (DimReduction output). Default: the authors' width for ``in_dim``
            (``acmil_inner_dim``): ResNet-18 / CLIP-B 512 -> 256, SSL ViT-S 384 -> 128, CLIP-L 768 -> 384,
            UNI 1024 -> 512, GigaPath 1536 -> 768; other widths ``in_dim // 2``.
        attn_dim: hidden width of the gated attention (128).
        num_branches: M attention branches (5); mask_k, mask_drop: STKIM's K (10) and p (0.6).
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
        dim = dim or acmil_inner_dim(in_dim)
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
# CLAM


class CLAMSB(MILHead):
    """CLAM single-branch (Lu et al. 2021): gated attention MIL + attention-guided instance clustering.

    ``fc: Linear(D -> dim) + ReLU + Dropout``; gated attention ``dim -> attn_dim -> 1`` (dropout on both gate
    branches); bag classifier ``Linear(dim -> C)``; one binary instance classifier per class. Defaults are the
    authors' ``CLAM_SB`` with ``size_arg='small'`` on 1024-d features (``attn_dim=384`` is their 'big').

    In ``loss`` (training), for the bag's class the ``k_sample`` most attended instances are pseudo-labelled
    positive and the ``k_sample`` least attended negative; with ``subtyping=True`` the most attended instances
    are also negatives for every other class (the terms are then averaged over the classes, as CLAM divides
    by their number). ``loss = bag_weight * CE + (1 - bag_weight) * instance CE``. Bags with fewer than
    ``k_sample`` instances (where CLAM's ``topk`` fails) sample ``N // 2``.

    Outputs: ``logits (B, C)``, ``attention (B, 1, N)``, ``attention_logits (B, 1, N)``, ``instance_feats
    (B, N, dim)`` and ``mask`` (used by ``loss``).
    """

    def __init__(
        self,
        in_dim: int = 1024,
        num_classes: int = 2,
        dim: int = 512,
        attn_dim: int = 256,
        dropout: float = 0.25,
        k_sample: int = 8,
        bag_weight: float = 0.7,
        subtyping: bool = False,
    ) -> None:
        super().__init__()
        self.in_dim, self.num_classes, self.dim, self.attn_dim = in_dim, num_classes, dim, attn_dim
        self.k_sample, self.bag_weight, self.subtyping = k_sample, bag_weight, subtyping
        self.fc = nn.Sequential(nn.Linear(in_dim, dim), nn.ReLU(inplace=True), nn.Dropout(dropout))
        self.attention = GatedAttention(dim, attn_dim, self._num_attention_maps(), dropout)
        self._build_classifiers()

    def _num_attention_maps(self) -> int:
        return 1

    def _build_classifiers(self) -> None:
        self.classifier = nn.Linear(self.dim, self.num_classes)
        self.instance_classifiers = nn.ModuleList([nn.Linear(self.dim, 2) for _ in range(self.num_classes)])

    def _bag_logits(self, z: torch.Tensor) -> torch.Tensor:
        """``z (B, K, dim)`` attention-pooled features -> ``(B, C)``."""
        return self.classifier(z[:, 0])

    def forward(self, feats: torch.Tensor, mask: torch.Tensor | None = None) -> dict[str, Any]:
        x, mask = self._prepare(feats, mask)
        h = self.fc(x)  # (B, N, dim)
        a_logits = self.attention(h)  # (B, K, N): K = 1 (SB) or C (MB)
        a = _masked_softmax(a_logits, mask)
        z = torch.bmm(a.to(h.dtype), h)  # (B, K, dim)
        return {
            "logits": self._bag_logits(z),
            "attention": a,
            "attention_logits": a_logits,
            "instance_feats": h,
            "mask": mask,
        }

    def _instance_loss(self, h: torch.Tensor, a: torch.Tensor, target: int) -> torch.Tensor:
        """Instance clustering CE for one bag: ``h (N, dim)`` real instances, ``a (K, N)`` attention (K = 1: one
        map for every class; K = C: class c samples from its own map, as CLAM-MB)."""
        n = h.shape[0]
        k = self.k_sample if n >= self.k_sample else n // 2  # CLAM's topk needs N >= k_sample
        if k == 0:
            return h.new_zeros(()).float()
        losses = []
        for c, clf in enumerate(self.instance_classifiers):
            if c != target and not self.subtyping:
                continue
            a_c = a[c if a.shape[0] > 1 else 0]
            top = a_c.topk(k).indices
            if c == target:
                bottom = (-a_c).topk(k).indices
                inst = torch.cat([h[top], h[bottom]])
                labels = torch.cat([torch.ones(k), torch.zeros(k)]).long().to(h.device)
            else:
                inst, labels = h[top], torch.zeros(k, dtype=torch.long, device=h.device)
            losses.append(F.cross_entropy(clf(inst).float(), labels))
        return torch.stack(losses).mean()

    def loss(self, out: dict[str, Any], target: torch.Tensor) -> dict[str, torch.Tensor]:
        ce = F.cross_entropy(out["logits"].float(), target)
        inst = torch.stack(
            [
                self._instance_loss(out["instance_feats"][b][m], out["attention"][b][:, m], int(target[b]))
                for b, m in enumerate(out["mask"])
            ]
        ).mean()
        return {"ce": ce, "instance": inst, "loss": self.bag_weight * ce + (1 - self.bag_weight) * inst}

    def reset_classifier(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self._build_classifiers()


class CLAMMB(CLAMSB):
    """CLAM multi-branch (``CLAM_MB``): one gated attention map and one bag classifier per class.

    Gated attention ``dim -> attn_dim -> C`` gives ``attention (B, C, N)``; class c pools ``z_c = a_c @ h`` and
    scores it with its own ``Linear(dim -> 1)`` (``bag_classifiers[c]``) -> ``logits (B, C)``. The instance
    clustering loss samples class c's instances from class c's attention map. Otherwise as ``CLAMSB``.
    """

    def _num_attention_maps(self) -> int:
        return self.num_classes

    def _build_classifiers(self) -> None:
        self.bag_classifiers = nn.ModuleList([nn.Linear(self.dim, 1) for _ in range(self.num_classes)])
        self.instance_classifiers = nn.ModuleList([nn.Linear(self.dim, 2) for _ in range(self.num_classes)])

    def _bag_logits(self, z: torch.Tensor) -> torch.Tensor:
        weight = torch.cat([clf.weight for clf in self.bag_classifiers])  # (C, dim)
        bias = torch.cat([clf.bias for clf in self.bag_classifiers])  # (C,)
        return torch.einsum("bcd,cd->bc", z, weight.to(z.dtype)) + bias.to(z.dtype)

    def reset_classifier(self, num_classes: int) -> None:
        # the attention has one map per class: it is replaced with the classifiers
        self.num_classes = num_classes
        self.attention.attention_w = nn.Linear(self.attn_dim, num_classes)
        self._build_classifiers()


# --------------------------------------------------------------------------------------------------
# TransMIL


class NystromAttention(nn.Module):
    """Multi-head Nyström self-attention (Xiong et al., AAAI 2021) as lucidrains' ``nystrom-attention``: O(N m).

    ``(B, N, dim) -> (B, N, dim)``. The sequence is front-padded with zero tokens to a multiple of
    ``num_landmarks`` (m); landmarks are segment means of queries and keys (zero tokens included, as there);
    the pseudo-inverse of the landmark kernel is approximated by ``pinv_iters`` Newton-Schulz iterations, whose
    initial scale is the largest row / column sum over the whole batch and all heads (as there); a depthwise
    convolution over the values (kernel ``residual_kernel``, no bias) is added as the residual.

    Args:
        exact_short_bags: for N < m use N landmarks (one per token, no zero tokens) instead of padding to m.
        legacy_slice: keep the first N outputs after padding (nystrom-attention <= 0.0.9) instead of the last N.
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
        exact_short_bags: bool = False,
        legacy_slice: bool = False,
    ) -> None:
        super().__init__()
        head_dim = head_dim or dim // num_heads
        self.num_heads, self.head_dim = num_heads, head_dim
        self.num_landmarks, self.pinv_iters = num_landmarks, pinv_iters
        self.exact_short_bags, self.legacy_slice = exact_short_bags, legacy_slice
        self.scale = head_dim**-0.5
        self.qkv = nn.Linear(dim, 3 * num_heads * head_dim, bias=False)
        self.proj = nn.Sequential(nn.Linear(num_heads * head_dim, dim), nn.Dropout(dropout))
        pad = residual_kernel // 2
        self.residual = nn.Conv2d(
            num_heads, num_heads, (residual_kernel, 1), padding=(pad, 0), groups=num_heads, bias=False
        )

    @staticmethod
    def _pinv(x: torch.Tensor, iters: int) -> torch.Tensor:
        """Iterative Moore–Penrose pseudo-inverse of a batch of row-stochastic matrices ``(..., m, m)``."""
        abs_x = x.abs()
        # one scale for the whole batch (max over every matrix), as nystrom-attention computes it
        scale = abs_x.sum(-1).max() * abs_x.sum(-2).max()
        z = x.transpose(-1, -2) / scale
        eye = torch.eye(x.shape[-1], device=x.device, dtype=x.dtype)
        for _ in range(iters):
            xz = x @ z
            z = 0.25 * z @ (13 * eye - xz @ (15 * eye - xz @ (7 * eye - xz)))
        return z

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, _ = x.shape
        m = min(self.num_landmarks, N) if self.exact_short_bags else self.num_landmarks
        pad = (m - N % m) % m
        if pad:
            x = F.pad(x, (0, 0, pad, 0))  # front padding with zero tokens, as the Nyströmformer does
        q, k, v = self.qkv(x).reshape(B, -1, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q = q * self.scale
        seg = q.shape[2] // m
        # landmarks: means over segments of `seg` tokens (zero tokens counted)
        q_l = q.reshape(B, self.num_heads, m, seg, self.head_dim).sum(3) / seg
        k_l = k.reshape(B, self.num_heads, m, seg, self.head_dim).sum(3) / seg
        kernel_1 = torch.softmax(q @ k_l.transpose(-1, -2), dim=-1)  # (B, H, N', m)
        kernel_2 = torch.softmax(q_l @ k_l.transpose(-1, -2), dim=-1)  # (B, H, m, m)
        kernel_3 = torch.softmax(q_l @ k.transpose(-1, -2), dim=-1)  # (B, H, m, N')
        out = kernel_1 @ self._pinv(kernel_2, self.pinv_iters) @ (kernel_3 @ v)
        out = out + self.residual(v)
        out = out.transpose(1, 2).reshape(B, -1, self.num_heads * self.head_dim)
        out = self.proj(out)
        return out[:, :N] if self.legacy_slice else out[:, -N:]


class _TransLayer(nn.Module):
    def __init__(self, dim: int, num_landmarks: int, exact_short_bags: bool, legacy_slice: bool) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.attn = NystromAttention(
            dim, num_heads=8, num_landmarks=num_landmarks, exact_short_bags=exact_short_bags, legacy_slice=legacy_slice
        )

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
        grid = self.convs[0](grid) + grid + self.convs[1](grid) + self.convs[2](grid)  # the authors' sum order
        return torch.cat([cls_token, grid.flatten(2).transpose(1, 2)], dim=1)


class TransMIL(MILHead):
    """TransMIL (Shao et al. 2021): correlated MIL with Nyström self-attention and PPEG.

    ``fc: Linear(D -> dim) + ReLU``; the N instances are padded to the next square S^2 by repeating the
    first ones; a class token (initialised N(0, 1), as the authors') is prepended; TransLayer -> PPEG ->
    TransLayer -> LayerNorm; the class token goes through ``Linear(dim -> C)``. Padded batches are run bag by
    bag (exact; MIL batches are small). Defaults are the authors' (1024-d features, width 512, 8 heads,
    ``dim // 2`` landmarks).

    Args:
        exact_short_bags: see ``NystromAttention`` (False = the reference's zero-token padding).
        legacy_nystrom: reproduce nystrom-attention 0.0.9 (TransMIL's requirements.txt pin), which kept the
            first N outputs after front padding; for checkpoints trained with that version.

    ``attention (B, 1, N)``: the class token's softmax attention over the instances in the last layer,
    averaged over heads (exact for that row; the layer itself uses the Nyström approximation).
    """

    def __init__(
        self,
        in_dim: int = 1024,
        num_classes: int = 2,
        dim: int = 512,
        num_landmarks: int | None = None,
        exact_short_bags: bool = False,
        legacy_nystrom: bool = False,
    ) -> None:
        super().__init__()
        self.in_dim, self.num_classes, self.dim = in_dim, num_classes, dim
        self.fc = nn.Sequential(nn.Linear(in_dim, dim), nn.ReLU(inplace=True))
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim))
        landmarks = num_landmarks or dim // 2  # TransMIL: dim // 2 landmarks
        self.layer1 = _TransLayer(dim, landmarks, exact_short_bags, legacy_nystrom)
        self.ppeg = _PPEG(dim)
        self.layer2 = _TransLayer(dim, landmarks, exact_short_bags, legacy_nystrom)
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
# authors' checkpoints

_Rules = tuple[tuple[str, str], ...]

# ACMIL code (architecture/transformer.py, network.py): ACMIL_GA and its ABMIL share these module names
_ACMIL_RULES: _Rules = (
    (r"^dimreduction\.fc1\.", "reduce.0."),
    (r"^attention\.attention_V\.0\.", "attention.attention_v."),
    (r"^attention\.attention_U\.0\.", "attention.attention_u."),
    (r"^attention\.attention_weights\.", "attention.attention_w."),
    (r"^classifier\.(\d+)\.fc\.", r"branch_classifiers.\1."),  # ACMIL_GA: one Classifier_1fc per branch
    (r"^classifier\.fc\.", "classifier."),  # ABMIL
    (r"^Slide_classifier\.fc\.", "classifier."),  # ACMIL_GA's slide classifier
)
# CLAM (models/model_clam.py): attention_net = Sequential(Linear, ReLU, [Dropout,] Attn_Net_Gated); index 3 since
# 2021 (Dropout always there), 2 in older code without dropout
_CLAM_RULES: _Rules = (
    (r"^attention_net\.0\.", "fc.0."),
    (r"^attention_net\.[23]\.attention_a\.0\.", "attention.attention_v."),
    (r"^attention_net\.[23]\.attention_b\.0\.", "attention.attention_u."),
    (r"^attention_net\.[23]\.attention_c\.", "attention.attention_w."),
    (r"^classifiers\.(\d+)\.", r"bag_classifiers.\1."),  # CLAM_MB: one Linear(dim, 1) per class
    (r"^classifiers\.", "classifier."),  # CLAM_SB
)
# TransMIL (models/TransMIL.py) on lucidrains' NystromAttention
_TRANSMIL_RULES: _Rules = (
    (r"^_fc1\.0\.", "fc.0."),
    (r"^_fc2\.", "classifier."),
    (r"^pos_layer\.proj\.", "ppeg.convs.0."),
    (r"^pos_layer\.proj1\.", "ppeg.convs.1."),
    (r"^pos_layer\.proj2\.", "ppeg.convs.2."),
    (r"^(layer[12])\.attn\.to_qkv\.", r"\1.attn.qkv."),
    (r"^(layer[12])\.attn\.to_out\.0\.", r"\1.attn.proj.0."),
    (r"^(layer[12])\.attn\.res_conv\.", r"\1.attn.residual."),
)

# authors' layouts zoo does not implement: key pattern -> what to say
_UNSUPPORTED = (
    (r"^(sub_attention|bag_attention)\.|^q$", "ACMIL_MHA (the `--arch mha` variant): zoo implements ACMIL_GA only"),
    (r"^dimreduction\.resBlocks\.", "DimReduction with residual blocks (numLayer_Res > 0)"),
    (r"^attention_net\.[23]\.module\.", "CLAM without gating (gate=False, Attn_Net): zoo implements the gated one"),
)


def _rename(state_dict: dict[str, Any], rules: _Rules) -> dict[str, Any]:
    out = {}
    for key, value in state_dict.items():
        for pattern, repl in rules:
            new, hits = re.subn(pattern, repl, key)
            if hits:
                key = new
                break
        out[key] = value
    return out


def _inferred_kwargs(model: nn.Module, state_dict: dict[str, Any]) -> dict[str, int]:
    """Constructor keywords read off a (mapped) checkpoint, to name the build that fits it."""

    def rows(key: str) -> int | None:
        value = state_dict.get(key)
        return int(value.shape[0]) if isinstance(value, torch.Tensor) and value.ndim else None

    def cols(key: str) -> int | None:
        value = state_dict.get(key)
        return int(value.shape[1]) if isinstance(value, torch.Tensor) and value.ndim == 2 else None

    first = "reduce.0.weight" if isinstance(model, (ABMIL, ACMIL)) else "fc.0.weight"
    found = {"in_dim": cols(first), "dim": rows(first)}
    if isinstance(model, (ABMIL, ACMIL, CLAMSB)):
        found["attn_dim"] = rows("attention.attention_v.weight")
    if isinstance(model, ACMIL):
        found["num_branches"] = rows("attention.attention_w.weight")
    if isinstance(model, CLAMMB):
        found["num_classes"] = rows("attention.attention_w.weight")
    else:
        found["num_classes"] = rows("classifier.weight")
    return {k: v for k, v in found.items() if v is not None}


def checkpoint_filter_fn(state_dict: dict[str, Any], model: nn.Module) -> dict[str, Any]:
    """Map an authors' checkpoint of a MIL head to zoo's keys; zoo's own layout passes through unchanged.

    Recognised (after the factory has unwrapped ``model`` / ``state_dict`` and stripped ``module.``):

    * ``ACMIL`` / ``ABMIL``: the ACMIL code's ``ACMIL_GA`` and ``ABMIL`` (``dimreduction.fc1``, ``attention.
      attention_V/U/weights``, ``classifier[.i].fc``, ``Slide_classifier.fc``). An ``ACMIL_GA`` with one branch
      (the README's ABMIL baseline) also loads into ``ABMIL``: its branch classifier, which does not reach the
      slide logits, is dropped.
    * ``CLAMSB`` / ``CLAMMB``: CLAM's ``CLAM_SB`` / ``CLAM_MB`` (``attention_net.0``, ``attention_net.3.
      attention_a/b/c``, ``classifiers``, ``instance_classifiers``); a DataParallel ``attention_net.module.``
      (CLAM's ``relocate()``) is unwrapped and ``instance_loss_fn.*`` (the smooth-SVM loss's buffer) dropped,
      as CLAM's own ``initiate_model`` does.
    * ``TransMIL``: TransMIL's ``_fc1``, ``pos_layer.proj*``, ``layer*.attn.to_qkv/to_out/res_conv``, ``_fc2``;
      a PyTorch Lightning ``model.`` prefix (TransMIL's training) is stripped.

    Raises:
        ValueError: a layout zoo does not implement (ACMIL_MHA, CLAM without gating), or weights of other sizes
            than the model's, naming the keywords (``in_dim=``, ``num_classes=``...) to build it with.
    """
    own = model.state_dict()
    if set(state_dict) <= set(own):  # zoo's layout (a `zoo mil train` checkpoint, model.state_dict())
        return state_dict
    rules = _family_rules(model)
    if rules is None:  # no authors' layout known for this head: the loader reports what differs
        return state_dict
    out = dict(state_dict)
    if out and all(k.startswith("model.") for k in out):  # PyTorch Lightning wraps the network as `model`
        out = {k[len("model.") :]: v for k, v in out.items()}
    if isinstance(model, CLAMSB):  # as CLAM's initiate_model: no DataParallel wrapper, no loss buffers
        out = {re.sub(r"^attention_net\.module\.", "attention_net.", k): v for k, v in out.items()}
        out = {k: v for k, v in out.items() if not k.startswith("instance_loss_fn.")}
    for pattern, what in _UNSUPPORTED:
        if any(re.search(pattern, k) for k in out):
            raise ValueError(f"checkpoint holds {what}; it cannot be loaded into {type(model).__name__}")
    from_authors = any(re.search(pattern, k) for k in out for pattern, _ in rules)
    out = _rename(out, rules)
    if not from_authors:  # another zoo head's layout, or something else: the loader reports what differs
        return state_dict
    if isinstance(model, ABMIL) and any(k.startswith("branch_classifiers.") for k in out):
        weights = out.get("attention.attention_w.weight")
        branches = int(weights.shape[0]) if isinstance(weights, torch.Tensor) else 1
        if branches != 1:
            raise ValueError(
                f"checkpoint is an ACMIL_GA with {branches} attention branches, not ABMIL: build "
                f"zoo.create_model('acmil', num_branches={branches}, ...) to load it"
            )
        # ACMIL_GA with n_token=1: the branch classifier is not part of ABMIL (nor of its slide logits)
        out = {k: v for k, v in out.items() if not k.startswith("branch_classifiers.")}
    wrong = [k for k, v in out.items() if k in own and getattr(v, "shape", None) != own[k].shape]
    if wrong:
        fits = ", ".join(f"{k}={v}" for k, v in _inferred_kwargs(model, out).items())
        raise ValueError(
            f"checkpoint does not fit this {type(model).__name__} ({wrong[0]} {tuple(out[wrong[0]].shape)} vs "
            f"{tuple(own[wrong[0]].shape)}): it was trained with {fits}; build the head with those keywords"
        )
    return out


def _family_rules(model: nn.Module) -> _Rules | None:
    if isinstance(model, (ABMIL, ACMIL)):
        return _ACMIL_RULES
    if isinstance(model, CLAMSB):
        return _CLAM_RULES
    if isinstance(model, TransMIL):
        return _TRANSMIL_RULES
    return None


# --------------------------------------------------------------------------------------------------
# registry


def _create_mil(cls: type[MILHead], name: str, pretrained: bool = False, **kwargs: Any) -> MILHead:
    """Build a head; its pretrained cfg is attached for tools; ``device=`` builds on that device (``meta``).

    ``zoo.create_model`` calls this with ``pretrained=False`` and loads weight files itself (through
    ``checkpoint_filter_fn``). ``pretrained=True`` arrives from a direct call (``mil.abmil(pretrained=True)``): the
    cfg's file is fetched (offline: the factory's error naming the file route) and loaded the same way; a cfg
    without weights is refused with the file route.
    """
    from .._factory import fetch_pretrained_file, load_checkpoint_path, resolve_pretrained_cfg

    pretrained_cfg = kwargs.pop("pretrained_cfg", None)
    overlay = kwargs.pop("pretrained_cfg_overlay", None)
    cache_dir = kwargs.pop("cache_dir", None)
    device = kwargs.pop("device", None)
    if pretrained_cfg is None or isinstance(pretrained_cfg, (str, dict)) or overlay:  # timm passes a tag
        pretrained_cfg = resolve_pretrained_cfg(name, pretrained_cfg, overlay)
    file = None
    if pretrained:
        if not pretrained_cfg.has_weights:
            raise RuntimeError(
                f"{name}(pretrained=True): {name!r} has no published weights; MIL heads load weight files through "
                f"the factory, zoo.create_model({name!r}, pretrained=True, pretrained_cfg_overlay=dict(file="
                f"'/path/to/checkpoint.pth')) or zoo.create_model({name!r}, checkpoint_path='/path/to/checkpoint."
                "pth') (zoo's and the authors' layouts both load)"
            )
        tag_name = f"{name}.{pretrained_cfg.tag}" if pretrained_cfg.tag else name
        file = fetch_pretrained_file(tag_name, pretrained_cfg, cache_dir)
    with torch.device(device) if device is not None else nullcontext():
        model = cls(**kwargs)
    model.pretrained_cfg = pretrained_cfg.to_dict()
    if file is not None:
        load_checkpoint_path(model, file, name, checkpoint_filter_fn)
    return model


@register_model(kind="mil_head")
def mean_mil(pretrained: bool = False, **kwargs: Any) -> MeanMIL:
    """Mean pooling MIL baseline."""
    return _create_mil(MeanMIL, "mean_mil", pretrained, **kwargs)


@register_model(kind="mil_head")
def max_mil(pretrained: bool = False, **kwargs: Any) -> MaxMIL:
    """Max pooling (instance classifier) MIL baseline."""
    return _create_mil(MaxMIL, "max_mil", pretrained, **kwargs)


@register_model(kind="mil_head")
def abmil(pretrained: bool = False, **kwargs: Any) -> ABMIL:
    """Gated attention MIL (Ilse et al. 2018), ACMIL's baseline form."""
    return _create_mil(ABMIL, "abmil", pretrained, **kwargs)


@register_model(kind="mil_head")
def acmil(pretrained: bool = False, **kwargs: Any) -> ACMIL:
    """ACMIL (gated, M=5, STKIM K=10 p=0.6), ECCV 2024."""
    return _create_mil(ACMIL, "acmil", pretrained, **kwargs)


@register_model(kind="mil_head")
def clam_sb_mil(pretrained: bool = False, **kwargs: Any) -> CLAMSB:
    """CLAM single-branch with instance clustering loss."""
    return _create_mil(CLAMSB, "clam_sb_mil", pretrained, **kwargs)


@register_model(kind="mil_head")
def clam_mb_mil(pretrained: bool = False, **kwargs: Any) -> CLAMMB:
    """CLAM multi-branch (one attention map and bag classifier per class) with instance clustering loss."""
    return _create_mil(CLAMMB, "clam_mb_mil", pretrained, **kwargs)


@register_model(kind="mil_head")
def transmil(pretrained: bool = False, **kwargs: Any) -> TransMIL:
    """TransMIL (Nyström attention + PPEG)."""
    return _create_mil(TransMIL, "transmil", pretrained, **kwargs)
