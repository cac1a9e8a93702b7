"""OAT: Object-level Attention Transformer for visual-search scanpaths (Fang et al., ECCV 2024).

Contract (registry kind ``scanpath``): built from its own keyword arguments (``grid=(rows, cols)``,
``max_objects``, sizes); all have the defaults of the authors' code (paper sizes, Amazon grid).

* Inputs (batch-first): ``crops`` (B, P, 3, H, W) object crops, ``positions`` (B, P, 2) long (row, col) on
  the grid, ``target`` (B,) long object index, ``object_mask`` (B, P) bool (True = real object; displays
  with fewer than ``max_objects`` objects are padded), ``fixations`` (B, T) long object indices padded
  with -1.
* Vocabulary with P = ``max_objects``: objects 0..P-1, ``eos = P`` (also the encoder index of the target
  token: **pointing at the target token means stop**), ``pad = P + 1``, ``bos = P + 2``.
* ``forward(...) -> logits (B, T + 1, P + 2)``: teacher-forced pointer logits; step t predicts fixation
  t + 1 of the sequence ``fixations + [eos]`` (``decoder_targets`` builds it, ``loss`` is the cross-entropy
  with pad ignored). Padded objects get -inf; the pad slot's logit is the pointer's mixing bias, as in the
  original (``pad_logit='zero'``: a constant 0).
* ``generate(..., max_len, sample=False, num_samples=1)`` -> ``list`` (B or B·num_samples) of object-index
  lists: greedy or multinomial decoding; the first step excludes eos, every step excludes pad and padded
  objects; a sequence ends at eos (not included) or at ``max_len`` fixations.

Model: object token = [appearance (d_model - 256) ‖ position (256)]; appearance from a small CNN on each
crop (150 x 93 in the paper) or from any zoo/timm backbone (``appearance='resnet18'``); position =
W[row] ‖ W[col] ‖ W[is_target] truncated to 256, with W a frozen table whose row cosine similarities are
exp(-(i - j)² / (2σ²)), σ = 2 (``gaussian_similarity_table``, rows of norm ``pos_norm``). Encoder input: the P
objects (is_target = 0) and the target token appended (the target's crop and position, is_target = 1); no
sequential encoding. Decoder input: BOS (an all-ones crop at the grid centre) then the fixated objects' tokens
(is_target = 1 on the target), plus a sinusoidal temporal encoding. Stock post-norm ReLU ``nn.Transformer``
layers, 4 + 4, 4 heads, FFN 512, dropout 0.1, no final LayerNorm; pointer head: 2 heads of
⟨W_d dec, W_e enc⟩ / √512 mixed by Linear(2 -> 1), the pad slot a 0 score per head (so its logit is the mixing
bias).

Reference: the defaults are the authors' model (``FAMILY['references']``); what zoo keeps besides is a keyword
in ``FAMILY['deviations']``. The authors' checkpoints load as they are (``checkpoint_filter_fn``): their
PyTorch-Lightning ``.ckpt`` (or a bare ``Seq2SeqTransformer`` state dict) plus their position table, which is
not in the state dict, as the second input ``pos_table_file`` (a ``.npy`` read without pickle)::

    zoo.create_model("oat", checkpoint_path="epoch=42-step=999.ckpt",
                     pos_table_file="src/model/amazon_learned_random_PE.npy")

or ``zoo scanpath convert --checkpoint ... --pos-table ... --out oat.pth`` once, to a zoo file.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from timm.models import PretrainedCfg, generate_default_cfgs

from .._registry import register_model

__all__ = [
    "FAMILY",
    "OAT",
    "AppearanceCNN",
    "PointerHead",
    "checkpoint_filter_fn",
    "gaussian_similarity_table",
    "read_pos_table",
    "fit_gaussian_similarity_table",
]

_REF = "HKUST-NISL/oat_eccv24@0c48c3e3"  # the authors' code: PyTorch Lightning 1.x, no licence file
AMAZON_TABLE_NORM = 8.764  # row norm of the authors' src/model/amazon_learned_random_PE.npy (all 14 rows)

FAMILY = dict(
    name="OAT",
    title="Object-level Attention Transformer for gaze scanpath prediction in visual search (OAT)",
    paper_ids="arXiv:2407.13335",
    origin_url="https://github.com/HKUST-NISL/oat_eccv24",
    implementation="zoo (`zoo.heads.scanpath`), re-implemented from the paper and the code's architecture "
    "(the original has no licence file: nothing is vendored)",
    citation="""@inproceedings{fang2024oat,
  title={Object-level Attention Transformer for Gaze Scanpath Prediction},
  author={Fang, Yini and Yu, Jingling and Zhang, Haozheng and van der Lans, Ralf and Shi, Bertram},
  booktitle={ECCV},
  year={2024}
}""",
    reported_top1={},
    reported_source="no accuracy applies (scanpath metrics); the paper's tables were not verified",
    notes=(
        "Scanpath head (kind `scanpath`): objects + target token -> autoregressive pointer over objects; "
        "pointing at the target token stops. Trained with `zoo scanpath train` (teacher forcing, cross-"
        "entropy); `zoo scanpath eval` reports sequence score, edit distance, MultiMatch and the five "
        "behavioural statistics. The authors released no trained checkpoints (checked at 0c48c3e3: the README "
        "links only the datasets), so the only tag is `.untrained`. A checkpoint trained with their code loads "
        "as saved: `zoo.create_model('oat', checkpoint_path='<their .ckpt>', pos_table_file='<their .npy>')` "
        "(or `pretrained=True, pretrained_cfg_overlay=dict(file=...)`), or convert it once with `zoo scanpath "
        "convert`. Their position tables ship in their repository (src/model/amazon_learned_random_PE.npy for "
        "the Amazon 6 x 14 grid, learned_PE_random_2.npy for wine 2 x 11 and yogurt 3 x 9); without a table "
        "file zoo builds the exact optimum of their offline fit (eigen-decomposition of the Gaussian similarity "
        "matrix) with the row norm of the Amazon table."
    ),
    references={
        "oat": f"{_REF}, src/model/models.py `Seq2SeqTransformer` as src/model/transformerLightning.py "
        "`TransformerModel` builds it with src/run.py's defaults (Amazon: 84 objects on 6 x 14, "
        "`-functionChoice learned -CA_version 3 -CA_head 2 -CA_dk 512 -spp 0`); 18,255,843 parameters used in "
        "the forward (their `generator` and `LinearEmbedding`, 45,142 more, are never called); parity 1e-5 "
        "on the teacher-forced pointer logits (objects, EOS and pad; float32, eval mode), their Lightning "
        "checkpoint and table loaded as they are: max abs diff 2.4e-6 on a checkpoint their training wrote "
        "(Lightning 1.9.5, one step)",
    },
    deviations={
        "oat": {
            "pos_table_file": "default None: zoo's own table (exact optimum of the authors' Gaussian-similarity "
            "fit, seeded rotation), not their randomly initialised Adam fit; pass their .npy to use theirs "
            "(needed for their checkpoints)",
            "pos_norm": "default 8.764, the row norm of their Amazon table (learned_PE_random_2.npy for wine / "
            "yogurt has 5.895); 1.0 gives zoo's earlier unit-norm rows (position ~8.8x weaker against appearance)",
            "final_norm": "default False, as the original; True adds nn.Transformer's LayerNorm after the "
            "encoder and the decoder stacks (2 x 2 x d_model parameters, zoo's layout before parity)",
            "pad_logit": "default 'bias': the pad slot scores 0 in each pointer head, so its logit is the mixing "
            "Linear's bias, as the original's; 'zero' makes it a constant 0 (objects and EOS unchanged)",
        },
    },
)


def _cfg(**kwargs: Any) -> dict[str, Any]:
    return {
        "url": "", "license": "unknown (original code has no licence; zoo's re-implementation is apache-2.0)",
        "paper_ids": FAMILY["paper_ids"], "paper_name": FAMILY["title"], "origin_url": FAMILY["origin_url"],
        "notes": "no weights: train with `zoo scanpath train`", "num_classes": 0, **kwargs,
    }  # fmt: skip


default_cfgs = generate_default_cfgs({"oat.untrained": _cfg()})


def gaussian_similarity_table(
    num_positions: int, dim: int = 86, sigma: float = 2.0, seed: int = 0, norm: float = 1.0
) -> torch.Tensor:
    """A (num_positions, dim) table whose row cosine similarities are exactly exp(-(i - j)² / (2σ²)).

    The original fits such a table with Adam from a random start; the Gaussian kernel matrix K is positive
    semi-definite, so K = V Λ Vᵀ gives rows V √Λ with unit norms and the wanted cosines: the optimum of that
    fit. A seeded random orthonormal rotation spreads the rows over all ``dim`` channels, as a fit would. Every
    row has norm ``norm`` (the fit's penalty makes the norms equal; their value is what the random start gave).
    """
    if dim < num_positions:
        raise ValueError(f"table dim {dim} must be >= num_positions {num_positions}")
    idx = torch.arange(num_positions, dtype=torch.float64)
    kernel = torch.exp(-((idx[:, None] - idx[None, :]) ** 2) / (2 * sigma**2))
    eigvals, eigvecs = torch.linalg.eigh(kernel)
    rows = eigvecs * eigvals.clamp_min(0).sqrt()  # (R, R), rows @ rows.T == kernel
    g = torch.Generator().manual_seed(seed)
    rotation, _ = torch.linalg.qr(torch.randn(dim, num_positions, generator=g, dtype=torch.float64))  # (dim, R)
    return (norm * rows @ rotation.t()).float()


def read_pos_table(path: str | os.PathLike) -> torch.Tensor:
    """The authors' position table: a (R, dim) float ``.npy`` (``src/model/*.npy``), read without pickle."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"position table {path} does not exist: pass the authors' .npy (src/model/amazon_learned_random_PE.npy "
            f"for the Amazon grid, src/model/learned_PE_random_2.npy for wine / yogurt in {FAMILY['origin_url']})"
        )
    try:
        table = np.load(path, allow_pickle=False)  # a file handed in never runs code
    except (ValueError, OSError, EOFError) as err:
        raise ValueError(f"position table {path} is not a readable .npy array ({err})") from None
    if not isinstance(table, np.ndarray) or table.ndim != 2 or not np.issubdtype(table.dtype, np.floating):
        what = f"a {table.ndim}-d {table.dtype} array" if isinstance(table, np.ndarray) else type(table).__name__
        raise ValueError(f"position table {path} holds {what}; expected a 2-d float array (rows, dim)")
    if not np.isfinite(table).all():
        raise ValueError(f"position table {path} holds NaN or infinite values")
    return torch.from_numpy(table.astype(np.float32))


def fit_gaussian_similarity_table(
    num_positions: int, dim: int = 86, sigma: float = 2.0, steps: int = 10_000, lr: float = 0.01, seed: int = 0
) -> torch.Tensor:
    """The original's offline fit (Adam on cosine-similarity error + equal-norm penalty), for comparison."""
    g = torch.Generator().manual_seed(seed)
    table = torch.randn(num_positions, dim, generator=g).requires_grad_(True)
    idx = torch.arange(num_positions, dtype=torch.float32)
    wanted = torch.exp(-((idx[:, None] - idx[None, :]) ** 2) / (2 * sigma**2))
    opt = torch.optim.Adam([table], lr=lr)
    for _ in range(steps):
        unit = table / table.norm(dim=1, keepdim=True)
        norms = table.norm(dim=1)
        loss = ((unit @ unit.t() - wanted) ** 2).mean() + ((norms - norms.mean()) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return table.detach()


class AppearanceCNN(nn.Module):
    """conv 3->16 5x5 + ReLU + max-pool 5 -> conv 16->32 3x3 + ReLU + max-pool 3 -> flatten -> Linear.

    (N, 3, H, W) -> (N, out_dim); at 150 x 93 the flatten is 32 x 9 x 5 = 1440, as in the paper.
    """

    def __init__(self, crop_size: tuple[int, int] = (150, 93), out_dim: int = 256) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 16, 5), nn.ReLU(), nn.MaxPool2d(5), nn.Conv2d(16, 32, 3), nn.ReLU(), nn.MaxPool2d(3)
        )
        h, w = crop_size
        h, w = ((h - 4) // 5 - 2) // 3, ((w - 4) // 5 - 2) // 3
        if h < 1 or w < 1:
            raise ValueError(f"crop_size {crop_size} is too small for the OAT CNN (needs at least 29 x 29)")
        self.fc = nn.Linear(32 * h * w, out_dim)

    def forward(self, crops: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(crops).flatten(1))


class BackboneAppearance(nn.Module):
    """Any zoo / timm backbone's pooled features projected to ``out_dim``: (N, 3, H, W) -> (N, out_dim)."""

    def __init__(self, name: str, out_dim: int, **kwargs: Any) -> None:
        super().__init__()
        from .._factory import create_model  # by name through the registry, never a model import

        self.backbone = create_model(name, num_classes=0, **kwargs)
        self.fc = nn.Linear(self.backbone.num_features, out_dim)

    def forward(self, crops: torch.Tensor) -> torch.Tensor:
        return self.fc(self.backbone(crops))


class PointerHead(nn.Module):
    """Object attention: per head h, s_h[t, j] = ⟨W_d^h dec_t, W_e^h enc_j⟩ / √d_k; Linear(heads -> 1) mixes.

    (B, T, D), (B, S, D), mask (B, S) -> logits (B, T, S + 1): the last column is the pad slot, which scores 0
    in every head, so its logit is the mixing bias (``pad_logit='bias'``, the original's) or 0 (``'zero'``).
    """

    def __init__(self, d_model: int = 512, num_heads: int = 2, d_k: int = 512, pad_logit: str = "bias") -> None:
        super().__init__()
        if pad_logit not in ("bias", "zero"):
            raise ValueError(f"pad_logit must be 'bias' (the original's) or 'zero', not {pad_logit!r}")
        self.dec = nn.ModuleList(nn.Linear(d_model, d_k) for _ in range(num_heads))
        self.enc = nn.ModuleList(nn.Linear(d_model, d_k) for _ in range(num_heads))
        self.mix = nn.Linear(num_heads, 1)
        self.scale = d_k**-0.5
        self.pad_logit = pad_logit

    def forward(self, dec: torch.Tensor, enc: torch.Tensor, enc_mask: torch.Tensor) -> torch.Tensor:
        scores = torch.stack([(d(dec) @ e(enc).transpose(1, 2)) * self.scale for d, e in zip(self.dec, self.enc)], -1)
        logits = self.mix(scores).squeeze(-1)  # (B, T, S)
        logits = logits.masked_fill(~enc_mask[:, None, :], float("-inf"))
        # the original appends a 0 score per head before mixing: mix(0) is the bias
        pad = self.mix.bias if self.pad_logit == "bias" else logits.new_zeros(1)
        return torch.cat([logits, pad.to(logits.dtype).expand(*logits.shape[:2], 1)], dim=-1)


def _sinusoidal(length: int, dim: int) -> torch.Tensor:
    pos = torch.arange(length, dtype=torch.float32)[:, None]
    freq = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
    pe = torch.zeros(length, dim)
    pe[:, 0::2], pe[:, 1::2] = torch.sin(pos * freq), torch.cos(pos * freq)
    return pe


class OAT(nn.Module):
    """Object-level Attention Transformer; see the module docstring for inputs, vocabulary and outputs.

    Every default is the authors' model; the keywords besides the sizes are the deviations zoo keeps
    (``FAMILY['deviations']``):

    * ``pos_norm``: row norm of the generated position table (the authors' Amazon table: 8.764).
    * ``pos_table``: a (R, pos_table_dim) table used instead of the generated one (the authors' .npy, see
      ``read_pos_table``); its first max(rows, cols, 2) rows are kept, the only ones ever indexed.
    * ``pad_logit``: 'bias' (the original: the pad slot's logit is the pointer's mixing bias) or 'zero'.
    * ``final_norm``: a LayerNorm after the encoder and after the decoder stack (the original has none).
    """

    def __init__(
        self,
        grid: tuple[int, int] = (6, 14),
        max_objects: int | None = None,
        d_model: int = 512,
        num_heads: int = 4,
        num_encoder_layers: int = 4,
        num_decoder_layers: int = 4,
        dim_feedforward: int = 512,
        dropout: float = 0.1,
        crop_size: tuple[int, int] = (150, 93),
        appearance: str = "cnn",
        appearance_kwargs: dict[str, Any] | None = None,
        pos_table_dim: int = 86,
        pos_dim: int = 256,
        pos_sigma: float = 2.0,
        pos_norm: float = AMAZON_TABLE_NORM,
        pos_table: torch.Tensor | None = None,
        pointer_heads: int = 2,
        pointer_dim: int = 512,
        pad_logit: str = "bias",
        final_norm: bool = False,
        max_len: int = 128,
    ) -> None:
        super().__init__()
        rows, cols = grid
        if rows < 1 or cols < 1 or (max_objects is not None and max_objects < 1):
            # checked before use: max_objects=0 would otherwise fall back to rows * cols silently
            raise ValueError(
                f"OAT: grid={tuple(grid)} and max_objects={max_objects} must be >= 1 (or max_objects=None)"
            )
        self.grid, self.crop_size = (int(rows), int(cols)), tuple(crop_size)
        self.max_objects = int(max_objects or rows * cols)
        self.eos, self.pad, self.bos = self.max_objects, self.max_objects + 1, self.max_objects + 2
        self.d_model, self.max_len = d_model, max_len
        if pos_dim >= d_model or pos_dim > 3 * pos_table_dim:
            raise ValueError(f"pos_dim {pos_dim} must be < d_model {d_model} and <= 3 * pos_table_dim {pos_table_dim}")
        if not pos_norm > 0:
            raise ValueError(f"pos_norm {pos_norm} must be > 0 (the authors' Amazon table: {AMAZON_TABLE_NORM})")
        num_rows = max(rows, cols, 2)  # indices: row < rows, col < cols, is_target in {0, 1}
        if pos_table is None:
            table = gaussian_similarity_table(num_rows, pos_table_dim, pos_sigma, norm=pos_norm)
        else:
            if pos_table.ndim != 2 or pos_table.shape[1] != pos_table_dim or pos_table.shape[0] < num_rows:
                raise ValueError(
                    f"pos_table of shape {tuple(pos_table.shape)} does not fit a {rows}x{cols} grid: it needs at "
                    f"least {num_rows} rows of pos_table_dim={pos_table_dim} (pass pos_table_dim={pos_table.shape[-1]}"
                    " for a table of another width)"
                )
            table = pos_table[:num_rows].detach().float().clone()
        # frozen: the original fits the table offline and loads it, it is not trained with the model
        self.register_buffer("pos_table", table)
        self.pos_table_given = pos_table is not None  # an authors' checkpoint needs their table (the filter checks)
        self.pos_dim = pos_dim
        app_dim = d_model - pos_dim
        if appearance == "cnn":
            self.appearance = AppearanceCNN(self.crop_size, app_dim)
        else:
            self.appearance = BackboneAppearance(appearance, app_dim, **(appearance_kwargs or {}))
        enc_layer = nn.TransformerEncoderLayer(d_model, num_heads, dim_feedforward, dropout, batch_first=True)
        dec_layer = nn.TransformerDecoderLayer(d_model, num_heads, dim_feedforward, dropout, batch_first=True)
        self.final_norm = final_norm
        self.encoder = nn.TransformerEncoder(
            enc_layer, num_encoder_layers, norm=nn.LayerNorm(d_model) if final_norm else None,
            enable_nested_tensor=False,
        )  # fmt: skip
        self.decoder = nn.TransformerDecoder(
            dec_layer, num_decoder_layers, norm=nn.LayerNorm(d_model) if final_norm else None
        )
        self.register_buffer("temporal_pe", _sinusoidal(max_len + 2, d_model), persistent=False)
        self.temporal_drop = nn.Dropout(dropout)
        self.pointer = PointerHead(d_model, pointer_heads, pointer_dim, pad_logit)
        for p in self.parameters():  # the original: Xavier-uniform for every matrix
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)

    # -------------------------------------------------------------------------------------- tokens

    def position_encoding(self, positions: torch.Tensor, is_target: torch.Tensor) -> torch.Tensor:
        """(..., 2) (row, col) and (...) {0, 1} -> (..., pos_dim) = W[row] ‖ W[col] ‖ W[is_target] truncated."""
        rows, cols = self.grid
        if positions.numel() and (positions[..., 0].max() >= rows or positions[..., 1].max() >= cols):
            raise ValueError(
                f"a grid position {positions.view(-1, 2).max(0).values.tolist()} is outside the {rows}x{cols} grid"
            )
        table = self.pos_table
        pe = torch.cat([table[positions[..., 0]], table[positions[..., 1]], table[is_target.long()]], dim=-1)
        return pe[..., : self.pos_dim]

    def object_tokens(self, crops: torch.Tensor, positions: torch.Tensor, is_target: torch.Tensor) -> torch.Tensor:
        """(B, P, 3, H, W), (B, P, 2), (B, P) -> (B, P, d_model)."""
        B, P = crops.shape[:2]
        if tuple(crops.shape[-2:]) != self.crop_size:
            raise ValueError(f"crops are {tuple(crops.shape[-2:])}; this OAT takes {self.crop_size} (H, W) crops")
        app = self.appearance(crops.flatten(0, 1)).view(B, P, -1)
        return torch.cat([app, self.position_encoding(positions, is_target)], dim=-1)

    def encode(
        self,
        crops: torch.Tensor,
        positions: torch.Tensor,
        target: torch.Tensor,
        object_mask: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Encoder memory (B, P + 1, D) with the target token last, its mask, and the objects' input tokens."""
        B, P = crops.shape[:2]
        if P != self.max_objects:
            raise ValueError(
                f"got {P} objects per display; this OAT was built for max_objects={self.max_objects} (pad)"
            )
        if object_mask is None:
            object_mask = torch.ones(B, P, dtype=torch.bool, device=crops.device)
        if not bool(object_mask.gather(1, target[:, None]).all()):
            raise ValueError("a target index points at a padded object slot")
        zeros = torch.zeros(B, P, dtype=torch.long, device=crops.device)
        objects = self.object_tokens(crops, positions, zeros)  # (B, P, D), is_target = 0 for the list
        batch = torch.arange(B, device=crops.device)
        target_token = torch.cat(
            [
                objects[batch, target, : -self.pos_dim],
                self.position_encoding(positions[batch, target], torch.ones_like(target)),
            ],
            -1,
        )
        tokens = torch.cat([objects, target_token[:, None]], dim=1)
        mask = torch.cat([object_mask, object_mask.new_ones(B, 1)], dim=1)
        memory = self.encoder(tokens, src_key_padding_mask=~mask)
        # a fixation on the target is fed back as the target token (is_target = 1), any other as its list token
        return dict(memory=memory, mask=mask, objects=objects, target_token=target_token)

    def _bos_token(self, B: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        rows, cols = self.grid
        blank = torch.ones(1, 3, *self.crop_size, device=device, dtype=dtype)  # in the crops' dtype (.double())
        centre = torch.tensor([[rows // 2, cols // 2]], device=device)
        token = torch.cat([self.appearance(blank), self.position_encoding(centre, torch.zeros(1, device=device))], -1)
        return token.expand(B, -1)

    def _decoder_inputs(
        self, enc: dict[str, torch.Tensor], fixations: torch.Tensor, target: torch.Tensor
    ) -> torch.Tensor:
        """(B, T) object indices (-1 = pad) -> (B, T + 1, D): BOS then the fixated tokens, + temporal PE."""
        B, T = fixations.shape
        idx = fixations.clamp_min(0)
        tokens = enc["objects"].gather(1, idx[..., None].expand(-1, -1, self.d_model))
        on_target = (fixations == target[:, None])[..., None]
        tokens = torch.where(on_target, enc["target_token"][:, None], tokens)
        tokens = tokens.masked_fill((fixations < 0)[..., None], 0.0)
        tokens = torch.cat([self._bos_token(B, fixations.device, tokens.dtype)[:, None], tokens], dim=1)
        if T + 1 > self.temporal_pe.shape[0]:
            raise ValueError(f"sequence of {T} fixations is longer than max_len={self.max_len}")
        return self.temporal_drop(tokens + self.temporal_pe[: T + 1])

    def decode(self, enc: dict[str, torch.Tensor], fixations: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Pointer logits (B, T + 1, P + 2) for the decoder inputs BOS, fixations[:, :T]."""
        x = self._decoder_inputs(enc, fixations, target)
        L = x.shape[1]
        causal = torch.triu(torch.ones(L, L, dtype=torch.bool, device=x.device), diagonal=1)  # True = hidden
        pad = torch.cat([fixations.new_zeros(len(fixations), 1, dtype=torch.bool), fixations < 0], dim=1)
        out = self.decoder(
            x, enc["memory"], tgt_mask=causal, tgt_key_padding_mask=pad, memory_key_padding_mask=~enc["mask"]
        )
        return self.pointer(out, enc["memory"], enc["mask"])

    # -------------------------------------------------------------------------------------- training

    def forward(
        self,
        crops: torch.Tensor,
        positions: torch.Tensor,
        target: torch.Tensor,
        fixations: torch.Tensor,
        object_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Teacher-forced pointer logits (B, T + 1, P + 2)."""
        self._check_fixations(fixations, object_mask)
        return self.decode(self.encode(crops, positions, target, object_mask), fixations, target)

    def _check_fixations(self, fixations: torch.Tensor, object_mask: torch.Tensor | None) -> None:
        if fixations.numel() == 0 or bool((fixations[:, 0] < 0).any()):
            raise ValueError("a scanpath is empty: every sequence needs at least one fixated object")
        if bool((fixations >= self.max_objects).any()):
            raise ValueError(f"a fixation index is >= max_objects={self.max_objects}")
        if object_mask is not None:
            real = fixations >= 0
            if not bool(object_mask.gather(1, fixations.clamp_min(0))[real].all()):
                raise ValueError("a scanpath fixates a padded (non-existent) object slot")

    def decoder_targets(self, fixations: torch.Tensor) -> torch.Tensor:
        """(B, T) padded with -1 -> (B, T + 1): the fixations then eos, pad after."""
        lengths = (fixations >= 0).sum(1)
        targets = torch.cat([fixations, fixations.new_full((len(fixations), 1), -1)], dim=1)
        targets = targets.masked_fill(targets < 0, self.pad)
        targets[torch.arange(len(fixations)), lengths] = self.eos
        return targets

    def loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Cross-entropy of the teacher-forced pointer, pad ignored; ``batch`` from ``collate_scanpaths``."""
        logits = self(batch["crops"], batch["positions"], batch["target"], batch["fixations"], batch.get("object_mask"))
        targets = self.decoder_targets(batch["fixations"])
        return nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=self.pad)

    # -------------------------------------------------------------------------------------- inference

    @torch.no_grad()
    def generate(
        self,
        crops: torch.Tensor,
        positions: torch.Tensor,
        target: torch.Tensor,
        object_mask: torch.Tensor | None = None,
        max_len: int | None = None,
        sample: bool = False,
        num_samples: int = 1,
        temperature: float = 1.0,
        generator: torch.Generator | None = None,
    ) -> list[list[int]]:
        """Greedy (``sample=False``) or sampled scanpaths: B · num_samples lists of object indices, display-major."""
        max_len = min(max_len or self.max_len, self.max_len)
        if num_samples > 1:
            rep = lambda t: t.repeat_interleave(num_samples, 0) if t is not None else None  # noqa: E731
            crops, positions, target, object_mask = rep(crops), rep(positions), rep(target), rep(object_mask)
        enc = self.encode(crops, positions, target, object_mask)
        B = crops.shape[0]
        seqs = torch.full((B, 0), -1, dtype=torch.long, device=crops.device)
        done = torch.zeros(B, dtype=torch.bool, device=crops.device)
        for step in range(max_len):
            logits = self.decode(enc, seqs, target)[:, -1]  # (B, P + 2)
            logits[:, self.pad] = float("-inf")
            if step == 0:
                logits[:, self.eos] = float("-inf")
            if sample:
                probs = (logits / temperature).softmax(-1)
                nxt = torch.multinomial(probs, 1, generator=generator).squeeze(1)
            else:
                nxt = logits.argmax(-1)
            done = done | (nxt == self.eos)
            nxt = nxt.masked_fill(done, -1)
            seqs = torch.cat([seqs, nxt[:, None]], dim=1)
            if bool(done.all()):
                break
        return [[int(v) for v in row if v >= 0] for row in seqs]


# the authors' Seq2SeqTransformer (src/model/models.py) -> zoo's names; their Lightning module holds it as `model`
_AUTHORS_RENAMES = (
    (re.compile(r"^transformer_encoder\.layers\."), "encoder.layers."),
    (re.compile(r"^transformer_decoder\.layers\."), "decoder.layers."),
    (re.compile(r"^cnn_embedding\.cnn1\.0\."), "appearance.features.0."),
    (re.compile(r"^cnn_embedding\.cnn2\.0\."), "appearance.features.3."),
    (re.compile(r"^cnn_embedding\.fc\."), "appearance.fc."),
    (re.compile(r"^cross_attentions\.(\d+)\.decode_fc\."), r"pointer.dec.\1."),
    (re.compile(r"^cross_attentions\.(\d+)\.encode_fc\."), r"pointer.enc.\1."),
    (re.compile(r"^readout\."), "pointer.mix."),
)
# built by their constructor, never called in the pointer model's forward (CA_version=3): dropped
_AUTHORS_UNUSED = ("generator.", "LinearEmbedding.", "onedpositional_encoding.")
_AUTHORS_MARKERS = ("transformer_encoder.", "transformer_decoder.", "cnn_embedding.", "cross_attentions.")
_AUTHORS_GRIDS = {84: "Amazon grid=(6, 14)", 27: "yogurt grid=(3, 9)", 22: "wine grid=(2, 11)"}


def checkpoint_filter_fn(state_dict: dict[str, torch.Tensor], model: OAT) -> dict[str, torch.Tensor]:
    """The authors' checkpoint layout -> zoo's; zoo's own layout passes unchanged (idempotent).

    Takes the state dict of their Lightning ``TransformerModel`` (keys ``model.transformer_encoder...``; the
    factory has already taken ``state_dict`` out of the ``.ckpt``) or of a bare ``Seq2SeqTransformer``. Their
    position table is a plain attribute, not in the state dict: it comes from the model's ``pos_table`` built
    from ``pos_table_file``. Their ``generator``, ``LinearEmbedding`` and ``onedpositional_encoding`` entries are
    dropped (never used by the pointer model; the temporal table is the same sinusoid zoo computes).

    Raises:
        ValueError: an authors' checkpoint that this model cannot reproduce (no table file given, another
            number of objects, final_norm=True, the SPP CNN or the vocabulary head), with the keyword to pass.
    """
    if state_dict and all(k.startswith("model.") for k in state_dict):  # their LightningModule's attribute
        state_dict = {k[len("model.") :]: v for k, v in state_dict.items()}
    if not any(k.startswith(_AUTHORS_MARKERS) for k in state_dict):
        return state_dict  # zoo's layout
    name = "authors' OAT checkpoint (HKUST-NISL/oat_eccv24)"
    if not any(k.startswith("cross_attentions.") for k in state_dict):
        raise ValueError(
            f"{name} has no cross_attentions: it was trained with -CA_version 0 (a vocabulary generator head), "
            "which zoo does not implement; only the object-attention pointer (-CA_version 3, the default) loads"
        )
    generator = state_dict.get("generator.weight")
    # 0 rows: their mixed-layout model (transformerLightning_mixed.py, wine + yogurt), which fits any grid
    if generator is not None and generator.shape[0] > 0 and generator.shape[0] - 2 != model.max_objects:
        found = generator.shape[0] - 2
        raise ValueError(
            f"{name} was trained for {found} objects; this OAT has max_objects={model.max_objects}: build it with "
            f"{_AUTHORS_GRIDS.get(found, f'the grid of {found} objects (grid=(rows, cols))')}"
        )
    if model.final_norm:
        raise ValueError(f"{name} has no final LayerNorms: build with final_norm=False (the default)")
    if not model.pos_table_given:
        raise ValueError(
            f"{name} does not hold its position table (their Seq2SeqTransformer.pe is not in the state dict): "
            "pass the table it was trained with, pos_table_file='src/model/amazon_learned_random_PE.npy' (Amazon) "
            "or 'src/model/learned_PE_random_2.npy' (wine, yogurt) from their repository"
        )
    fc = state_dict.get("cnn_embedding.fc.weight")
    if fc is not None and isinstance(model.appearance, AppearanceCNN) and fc.shape != model.appearance.fc.weight.shape:
        raise ValueError(
            f"{name} has a CNN projection of shape {tuple(fc.shape)}; this OAT's is "
            f"{tuple(model.appearance.fc.weight.shape)}: the SPP variants (-spp 2/3/4, in-features 160 / 672 / "
            "2720) are not implemented, and without SPP the crops must be 150 x 93 (crop_size=(150, 93))"
        )
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if key.startswith(_AUTHORS_UNUSED):
            continue
        for pattern, replacement in _AUTHORS_RENAMES:
            key, hits = pattern.subn(replacement, key)
            if hits:
                break
        out[key] = value  # an unknown key stays as it is: the strict load names it
    heads = {k.split(".")[1] for k in state_dict if k.startswith("cross_attentions.")}
    if len(heads) == 1 and "pointer.mix.weight" in out:
        # -CA_head 1: their readout exists but is skipped, so the single head's scores are the logits (pad 0)
        out["pointer.mix.weight"] = torch.ones_like(out["pointer.mix.weight"])
        out["pointer.mix.bias"] = torch.zeros_like(out["pointer.mix.bias"])
    out["pos_table"] = model.pos_table.detach().clone()
    return out


@register_model(kind="scanpath")
def oat(
    pretrained: bool = False,
    pretrained_cfg: PretrainedCfg | None = None,
    pos_table_file: str | os.PathLike | None = None,
    **kwargs: Any,
) -> OAT:
    """OAT with the paper's sizes (Amazon grid 6 x 14 by default; pass ``grid=(rows, cols)``).

    ``pos_table_file``: the authors' position table (``.npy``, read without pickle), needed to load their
    checkpoints; without it the table is zoo's own (``gaussian_similarity_table``).
    """
    if pretrained:
        raise RuntimeError(
            "'oat' has no pretrained weights (none were released); train it with `zoo scanpath train`, or load a "
            "checkpoint of the authors' code with zoo.create_model('oat', checkpoint_path=..., pos_table_file=...)"
        )
    if pos_table_file is not None:
        kwargs["pos_table"] = read_pos_table(pos_table_file)
    model = OAT(**kwargs)
    model.pretrained_cfg = pretrained_cfg.to_dict() if pretrained_cfg is not None else {}
    return model
