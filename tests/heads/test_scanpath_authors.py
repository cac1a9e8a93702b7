"""OAT loads the authors' checkpoints as they are and reproduces their logits (HKUST-NISL/oat_eccv24@0c48c3e3).

Their training script (src/run.py) saves a PyTorch-Lightning 1.x checkpoint of ``TransformerModel``, whose
``model`` attribute is ``Seq2SeqTransformer`` (src/model/models.py); the position table is a plain attribute
loaded from a ``.npy``, not in the state dict. The key names and shapes below are written from their code (and
were checked against a checkpoint their own code wrote with Lightning 1.9.5); the values are seeded. The expected
logits are derived here, independently of zoo's model, from their forward's definition: sequence-first stock
post-norm transformer layers without final norms, the pointer's 0 pad score appended per head before the
``readout`` mix, computed in float64. Tolerances (absolute, on logits of size ~1): zoo in float64 1e-10
(measured 3e-14: the same math); zoo in float32 as loaded 1e-4 (measured <= 4e-5 with these seeded weights of
std 0.2; zoo in float32 against the authors' own code on a checkpoint their training wrote: 2.4e-6).
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import zoo
import zoo.heads.scanpath as scanpath  # registers 'oat' until zoo.heads imports it
from zoo.train import scanpath as scanpath_cli

# their Seq2SeqTransformer at small sizes its constructor accepts: emb 64, 2 heads, FFN 48, 2 + 2 layers, a
# 2 x 3 display, a table of 5 rows x 12 (its first 32 = emb / 2 dims: W[row] ‖ W[col] ‖ W[is_target][:8])
SMALL = dict(emb=64, nhead=2, ffn=48, n_enc=2, n_dec=2, rows=2, cols=3, table_rows=5, table_dim=12)
ZOO_SMALL = dict(
    grid=(2, 3), d_model=64, num_heads=2, num_encoder_layers=2, num_decoder_layers=2, dim_feedforward=48,
    pos_dim=32, pos_table_dim=12, pointer_dim=64,
)  # fmt: skip
ATOL64, ATOL32 = 1e-10, 1e-4  # float64 (measured 3e-14) / float32 as loaded (measured <= 4e-5)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def authors_shapes(
    emb: int = 512, ffn: int = 512, n_enc: int = 4, n_dec: int = 4, num_objects: int = 84, ca_heads: int = 2
) -> dict[str, tuple[int, ...]]:
    """Every entry of their ``TransformerModel.state_dict()``, in their order (defaults: src/run.py's Amazon)."""
    E, half = emb, emb // 2

    def attention(prefix: str) -> dict[str, tuple[int, ...]]:
        return {
            f"{prefix}in_proj_weight": (3 * E, E), f"{prefix}in_proj_bias": (3 * E,),
            f"{prefix}out_proj.weight": (E, E), f"{prefix}out_proj.bias": (E,),
        }  # fmt: skip

    def feedforward_norms(prefix: str, norms: int) -> dict[str, tuple[int, ...]]:
        shapes = {
            f"{prefix}linear1.weight": (ffn, E), f"{prefix}linear1.bias": (ffn,),
            f"{prefix}linear2.weight": (E, ffn), f"{prefix}linear2.bias": (E,),
        }  # fmt: skip
        for n in range(1, norms + 1):
            shapes |= {f"{prefix}norm{n}.weight": (E,), f"{prefix}norm{n}.bias": (E,)}
        return shapes

    shapes: dict[str, tuple[int, ...]] = {}
    for i in range(n_enc):
        p = f"model.transformer_encoder.layers.{i}."
        shapes |= attention(p + "self_attn.") | feedforward_norms(p, 2)
    for i in range(n_dec):
        p = f"model.transformer_decoder.layers.{i}."
        shapes |= attention(p + "self_attn.") | attention(p + "multihead_attn.") | feedforward_norms(p, 3)
    shapes |= {
        "model.generator.weight": (num_objects + 2, E), "model.generator.bias": (num_objects + 2,),
        "model.onedpositional_encoding.pos_embedding": (5000, 1, E),  # a buffer: PositionalEncoding(maxlen=5000)
        "model.cnn_embedding.cnn1.0.weight": (16, 3, 5, 5), "model.cnn_embedding.cnn1.0.bias": (16,),
        "model.cnn_embedding.cnn2.0.weight": (32, 16, 3, 3), "model.cnn_embedding.cnn2.0.bias": (32,),
        "model.cnn_embedding.fc.weight": (half, 1440), "model.cnn_embedding.fc.bias": (half,),
        "model.LinearEmbedding.weight": (half, 3), "model.LinearEmbedding.bias": (half,),
    }  # fmt: skip
    for h in range(ca_heads):
        for fc in ("decode_fc", "encode_fc"):
            shapes |= {f"model.cross_attentions.{h}.{fc}.weight": (E, E), f"model.cross_attentions.{h}.{fc}.bias": (E,)}
    return shapes | {"model.readout.weight": (1, ca_heads), "model.readout.bias": (1,)}


def _sinusoid(length: int, dim: int) -> torch.Tensor:
    """(length, dim): sin / cos of t · 10000^(-2i / dim) on the even / odd channels."""
    t = torch.arange(length, dtype=torch.float32)[:, None]
    angle = t * torch.exp(-torch.arange(0, dim, 2, dtype=torch.float32) * math.log(10000.0) / dim)
    return torch.stack([angle.sin(), angle.cos()], -1).flatten(1)


def authors_state_dict(seed: int = 0, ca_heads: int = 2) -> dict[str, torch.Tensor]:
    """Their state dict at the SMALL sizes with seeded values (norm weights near 1, so a swapped key shows)."""
    g = torch.Generator().manual_seed(seed)
    shapes = authors_shapes(SMALL["emb"], SMALL["ffn"], SMALL["n_enc"], SMALL["n_dec"], 6, ca_heads)
    sd = {}
    for key, shape in shapes.items():
        noise = torch.randn(shape, generator=g)
        if key.endswith("pos_embedding"):
            sd[key] = _sinusoid(5000, SMALL["emb"])[:, None]
        elif "norm" in key and key.endswith("weight"):
            sd[key] = 1 + 0.1 * noise
        elif key.startswith("model.readout."):  # a Linear(heads, 1): Xavier gives weights of size ~1
            sd[key] = noise
        else:
            sd[key] = noise * (0.1 if len(shape) == 1 else 0.2)
    return sd


def authors_table(seed: int = 1) -> np.ndarray:
    """A (rows, dim) float32 table like theirs (equal row norms, 8.764 as their Amazon table's)."""
    table = np.random.default_rng(seed).standard_normal((SMALL["table_rows"], SMALL["table_dim"]))
    return (8.764 * table / np.linalg.norm(table, axis=1, keepdims=True)).astype(np.float32)


def save_lightning_checkpoint(state_dict: dict[str, torch.Tensor], path: Path) -> Path:
    """What Lightning 1.9's ModelCheckpoint writes for their run.py (no hyper_parameters: they never save any)."""
    monitor = "validation_delta_each_epoch"
    torch.save(
        {
            "epoch": 3, "global_step": 120, "pytorch-lightning_version": "1.9.5", "state_dict": state_dict,
            "loops": {"fit_loop": {"epoch_progress": {"total": {"ready": 4, "completed": 3}}}},
            "callbacks": {
                f"EarlyStopping{{'monitor': '{monitor}', 'mode': 'min'}}": {
                    "wait_count": 0, "stopped_epoch": 0, "best_score": torch.tensor(0.42), "patience": 30,
                },
                f"ModelCheckpoint{{'monitor': '{monitor}', 'mode': 'min'}}": {
                    "monitor": monitor, "best_model_score": torch.tensor(0.42), "best_model_path": str(path),
                },
            },
            "optimizer_states": [{"state": {}, "param_groups": [
                {"lr": 1e-4, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0, "params": [0, 1]}]}],
            "lr_schedulers": [{"step_size": 1, "gamma": 1.0, "base_lrs": [1e-4], "last_epoch": 4}],
        },
        path,
    )  # fmt: skip
    return path


# ------------------------------------------------------------------------ their forward, derived independently


def _attention(x: torch.Tensor, memory: torch.Tensor, sd: dict, prefix: str, heads: int, causal: bool) -> torch.Tensor:
    """nn.MultiheadAttention's packed in-projection, one sequence: (Lq, E), (Lk, E) -> (Lq, E)."""
    E = x.shape[-1]
    w, b = sd[prefix + "in_proj_weight"], sd[prefix + "in_proj_bias"]
    q, k, v = x @ w[:E].T + b[:E], memory @ w[E : 2 * E].T + b[E : 2 * E], memory @ w[2 * E :].T + b[2 * E :]
    q, k, v = (t.view(len(t), heads, E // heads).transpose(0, 1) for t in (q, k, v))
    scores = q @ k.transpose(1, 2) / math.sqrt(E // heads)
    if causal:
        scores = scores.masked_fill(torch.ones(len(x), len(memory), dtype=torch.bool).triu(1), float("-inf"))
    out = (scores.softmax(-1) @ v).transpose(0, 1).reshape(len(x), E)
    return out @ sd[prefix + "out_proj.weight"].T + sd[prefix + "out_proj.bias"]


def _post_norm(x: torch.Tensor, update: torch.Tensor, sd: dict, prefix: str) -> torch.Tensor:
    return F.layer_norm(x + update, x.shape[-1:], sd[prefix + "weight"], sd[prefix + "bias"], eps=1e-5)


def _feedforward(x: torch.Tensor, sd: dict, prefix: str) -> torch.Tensor:
    hidden = torch.relu(x @ sd[prefix + "linear1.weight"].T + sd[prefix + "linear1.bias"])
    return hidden @ sd[prefix + "linear2.weight"].T + sd[prefix + "linear2.bias"]


def authors_logits(
    sd: dict[str, torch.Tensor], table: np.ndarray, crops: torch.Tensor, target: int, fixations: list[int]
) -> torch.Tensor:
    """Their teacher-forced logits for one display: (len(fixations) + 1, P + 2) = objects, EOS, PAD.

    ``crops`` (P, H, W, 3) channels-last as their collator builds them; ``sd`` their state dict. Computed in
    float64, so that the comparison measures zoo's float32 rounding only.
    """
    sd = {k.removeprefix("model."): v.double() for k, v in sd.items()}
    crops = crops.double()
    rows, cols, heads = SMALL["rows"], SMALL["cols"], SMALL["nhead"]
    P, E = rows * cols, SMALL["emb"]
    pe = torch.cat([torch.from_numpy(table).double(), torch.zeros(4, table.shape[1])])  # their 4 extra zero rows

    def position(row: int, col: int, is_target: int) -> torch.Tensor:
        return torch.cat([pe[row], pe[col], pe[is_target]])[: E // 2]

    def appearance(images: torch.Tensor) -> torch.Tensor:  # (N, H, W, 3) -> (N, E / 2)
        x = images.permute(0, 3, 1, 2)
        x = F.max_pool2d(torch.relu(F.conv2d(x, sd["cnn_embedding.cnn1.0.weight"], sd["cnn_embedding.cnn1.0.bias"])), 5)
        x = F.max_pool2d(torch.relu(F.conv2d(x, sd["cnn_embedding.cnn2.0.weight"], sd["cnn_embedding.cnn2.0.bias"])), 3)
        return x.flatten(1) @ sd["cnn_embedding.fc.weight"].T + sd["cnn_embedding.fc.bias"]

    # encoder: the P objects (is_target 0) then the target token (its crop, is_target 1)
    src = list(range(P)) + [target]
    src_pos = torch.stack([position(j // cols, j % cols, int(n == P)) for n, j in enumerate(src)])
    x = torch.cat([appearance(crops[src]), src_pos], -1)
    for i in range(SMALL["n_enc"]):
        p = f"transformer_encoder.layers.{i}."
        x = _post_norm(x, _attention(x, x, sd, p + "self_attn.", heads, False), sd, p + "norm1.")
        x = _post_norm(x, _feedforward(x, sd, p), sd, p + "norm2.")
    memory = x
    # decoder: BOS (all-ones crop at (rows / 2, cols / 2) truncated) then the fixations (is_target on the target)
    ones = torch.ones(1, *crops.shape[1:], dtype=crops.dtype)
    tgt_app = torch.cat([appearance(ones), appearance(crops[fixations])]) if fixations else appearance(ones)
    tgt_pos = [position(int(rows / 2), int(cols / 2), 0)]
    tgt_pos += [position(f // cols, f % cols, int(f == target)) for f in fixations]
    y = torch.cat([tgt_app, torch.stack(tgt_pos)], -1)
    y = y + _sinusoid(len(y), E).double()
    for i in range(SMALL["n_dec"]):
        p = f"transformer_decoder.layers.{i}."
        y = _post_norm(y, _attention(y, y, sd, p + "self_attn.", heads, True), sd, p + "norm1.")
        y = _post_norm(y, _attention(y, memory, sd, p + "multihead_attn.", heads, False), sd, p + "norm2.")
        y = _post_norm(y, _feedforward(y, sd, p), sd, p + "norm3.")
    # pointer: per head ⟨dec_fc(y), enc_fc(memory)⟩, a 0 pad column appended, / √d_k; readout mixes (> 1 head)
    scores = []
    for h in range(sum(k.endswith("decode_fc.weight") for k in sd)):
        a = f"cross_attentions.{h}."
        d = y @ sd[a + "decode_fc.weight"].T + sd[a + "decode_fc.bias"]
        e = memory @ sd[a + "encode_fc.weight"].T + sd[a + "encode_fc.bias"]
        scores.append(torch.cat([d @ e.T, y.new_zeros(len(y), 1)], -1) / math.sqrt(E))
    if len(scores) == 1:
        return scores[0]
    return sum(w * s for w, s in zip(sd["readout.weight"][0], scores)) + sd["readout.bias"]


# ------------------------------------------------------------------------ inputs


def _inputs(seed: int = 3) -> dict:
    g = torch.Generator().manual_seed(seed)
    P, cols = 6, SMALL["cols"]
    crops_hwc = torch.rand(2, P, 150, 93, 3, generator=g)  # their channels-last crops
    idx = torch.arange(P)
    return dict(
        crops_hwc=crops_hwc,
        crops=crops_hwc.permute(0, 1, 4, 2, 3).contiguous(),  # zoo's (B, P, 3, H, W)
        positions=torch.stack([idx // cols, idx % cols], -1).expand(2, -1, -1),
        target=torch.tensor([4, 1]),
        # a fixation on the target mid-way (fed back as the target token), a refixation, a shorter padded path
        sequences=[[0, 4, 5, 5], [2, 1]],
        fixations=torch.tensor([[0, 4, 5, 5], [2, 1, -1, -1]]),
    )


@pytest.fixture(scope="module")
def authors_files(tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("oat_authors")
    np.save(folder / "learned_PE.npy", authors_table())
    sd = authors_state_dict()
    return dict(
        sd=sd,
        ckpt=save_lightning_checkpoint(sd, folder / "epoch=3-step=120.ckpt"),
        table=folder / "learned_PE.npy",
        folder=folder,
    )


def _check_logits(model: torch.nn.Module, sd: dict, table: np.ndarray) -> None:
    """zoo's logits against the independently derived ones: objects, EOS and pad (their readout bias).

    In float64 the two computations agree to rounding (ATOL64: the same math); the float32 model as loaded
    within ATOL32.
    """
    x = _inputs()
    with torch.no_grad():
        ours32 = model.eval()(x["crops"], x["positions"], x["target"], x["fixations"])
        ours64 = copy.deepcopy(model).double()(x["crops"].double(), x["positions"], x["target"], x["fixations"])
    P = x["crops"].shape[1]
    for b, seq in enumerate(x["sequences"]):
        theirs = authors_logits(sd, table, x["crops_hwc"][b], int(x["target"][b]), seq)  # float64
        n = len(seq) + 1  # BOS + fixations: the rows the loss uses
        torch.testing.assert_close(ours64[b, :n, : P + 1], theirs[:, : P + 1], atol=ATOL64, rtol=0)  # objects, EOS
        torch.testing.assert_close(ours64[b, :n, P + 1], theirs[:, P + 1], atol=ATOL64, rtol=0)  # pad
        torch.testing.assert_close(ours32[b, :n].double(), theirs, atol=ATOL32, rtol=0)
        # logits of size ~1 that tell the objects apart: the tolerances are meaningful
        assert theirs.abs().max() > 0.5 and (theirs[:, :P].amax(1) - theirs[:, :P].amin(1)).min() > 0.05


# ------------------------------------------------------------------------ tests


@pytest.mark.parametrize("route", ["checkpoint_path", "pretrained_file"])
def test_authors_lightning_checkpoint_loads_as_saved_and_matches_their_logits(authors_files, route) -> None:
    ckpt, table = authors_files["ckpt"], authors_files["table"]
    source = dict(checkpoint_path=ckpt)
    if route == "pretrained_file":
        source = dict(pretrained=True, pretrained_cfg_overlay=dict(file=str(ckpt)))
    model = zoo.create_model("oat", pos_table_file=table, **ZOO_SMALL, **source)
    # their table rows beyond the grid's max(rows, cols, 2) are never indexed: kept are the first 3
    torch.testing.assert_close(model.pos_table, torch.from_numpy(np.load(table)[:3]), atol=0, rtol=0)
    _check_logits(model, authors_files["sd"], np.load(table))


def test_single_pointer_head_skips_their_readout(tmp_path) -> None:
    # -CA_head 1: their readout Linear(1, 1) is built but not applied, so the pad logit is 0
    sd = authors_state_dict(seed=5, ca_heads=1)
    np.save(tmp_path / "pe.npy", authors_table())
    ckpt = save_lightning_checkpoint(sd, tmp_path / "one_head.ckpt")
    model = zoo.create_model("oat", checkpoint_path=ckpt, pos_table_file=tmp_path / "pe.npy", pointer_heads=1,
                             **ZOO_SMALL)  # fmt: skip
    _check_logits(model, sd, authors_table())


def test_bare_seq2seq_state_dict_loads_too(authors_files, tmp_path) -> None:
    # torch.save(lightning_module.model.state_dict()): no "model." prefix, no Lightning wrapper
    sd = {k.removeprefix("model."): v for k, v in authors_files["sd"].items()}
    torch.save(sd, tmp_path / "seq2seq.pth")
    model = zoo.create_model(
        "oat", checkpoint_path=tmp_path / "seq2seq.pth", pos_table_file=authors_files["table"], **ZOO_SMALL
    )
    _check_logits(model, authors_files["sd"], np.load(authors_files["table"]))


def test_mixed_layout_checkpoint_loads_for_its_grids(authors_files, tmp_path) -> None:
    # transformerLightning_mixed.py (one model for wine and yogurt) builds its generator with 0 rows
    sd = {**authors_files["sd"], "model.generator.weight": torch.zeros(0, 64), "model.generator.bias": torch.zeros(0)}
    ckpt = save_lightning_checkpoint(sd, tmp_path / "mixed.ckpt")
    model = zoo.create_model("oat", checkpoint_path=ckpt, pos_table_file=authors_files["table"], **ZOO_SMALL)
    _check_logits(model, sd, np.load(authors_files["table"]))


def test_paper_size_keys_shapes_and_parameter_count() -> None:
    shapes = authors_shapes()  # src/run.py's defaults: Amazon, 84 objects, emb 512, FFN 512, 4 + 4, 2 heads
    theirs = {k: torch.empty(s, device="meta") for k, s in shapes.items()}
    total = sum(t.numel() for k, t in theirs.items() if not k.endswith("pos_embedding"))  # buffer, not a parameter
    unused = sum(t.numel() for k, t in theirs.items() if k.startswith(("model.generator.", "model.LinearEmbedding.")))
    assert (len(theirs), total, unused) == (141, 18_300_985, 45_142)
    table = torch.randn(14, 86)  # their Amazon table's shape
    model = scanpath.OAT(pos_table=table)
    mapped = scanpath.checkpoint_filter_fn(theirs, model)
    own = model.state_dict()
    assert {k: tuple(v.shape) for k, v in mapped.items()} == {k: tuple(v.shape) for k, v in own.items()}
    used = sum(mapped[k].numel() for k, _ in model.named_parameters())
    assert used == sum(p.numel() for p in model.parameters()) == total - unused == 18_255_843
    assert sum(p.numel() for p in zoo.create_model("oat").parameters()) == 18_255_843


def test_filter_is_idempotent_on_zoo_layouts() -> None:
    model = zoo.create_model("oat", **ZOO_SMALL)
    sd = model.state_dict()
    assert scanpath.checkpoint_filter_fn(sd, model) is sd
    # a zoo OAT trained inside a LightningModule as `model`: the prefix goes, nothing else changes
    wrapped = scanpath.checkpoint_filter_fn({f"model.{k}": v for k, v in sd.items()}, model)
    assert wrapped.keys() == sd.keys() and all(wrapped[k] is sd[k] for k in sd)


def test_authors_checkpoint_errors_name_the_fix(authors_files, tmp_path) -> None:
    ckpt, table = authors_files["ckpt"], authors_files["table"]
    with pytest.raises(ValueError, match="pos_table_file="):  # their table is not in their state dict
        zoo.create_model("oat", checkpoint_path=ckpt, **ZOO_SMALL)
    with pytest.raises(ValueError, match="trained for 6 objects; this OAT has max_objects=8"):
        zoo.create_model("oat", checkpoint_path=ckpt, pos_table_file=table, **{**ZOO_SMALL, "grid": (2, 4)})
    with pytest.raises(ValueError, match="final_norm=False"):
        zoo.create_model("oat", checkpoint_path=ckpt, pos_table_file=table, final_norm=True, **ZOO_SMALL)
    spp = {**authors_files["sd"], "model.cnn_embedding.fc.weight": torch.zeros(32, 160)}  # -spp 2
    with pytest.raises(ValueError, match="SPP"):
        zoo.create_model("oat", checkpoint_path=save_lightning_checkpoint(spp, tmp_path / "spp.ckpt"),
                         pos_table_file=table, **ZOO_SMALL)  # fmt: skip
    np.save(tmp_path / "objects.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="not a readable .npy"):  # a pickled array never loads
        zoo.create_model("oat", pos_table_file=tmp_path / "objects.npy", **ZOO_SMALL)
    with pytest.raises(ValueError, match="pos_table_dim=12"):
        zoo.create_model("oat", pos_table_file=table, **{**ZOO_SMALL, "pos_table_dim": 22})


def test_zoo_scanpath_convert(authors_files, tmp_path, capsys) -> None:
    import argparse

    parser = argparse.ArgumentParser(prog="zoo")
    scanpath_cli.add_cli(parser.add_subparsers(dest="command", required=True))
    kwargs = {k: v for k, v in ZOO_SMALL.items() if k != "grid"}
    out = tmp_path / "oat.pth"
    args = parser.parse_args([
        "scanpath", "convert", "--checkpoint", str(authors_files["ckpt"]), "--pos-table", str(authors_files["table"]),
        "--grid", "2", "3", "--model-kwargs", json.dumps(kwargs), "--max-len", "12", "--out", str(out),
    ])  # fmt: skip
    assert args.func(args) == 0
    saved = torch.load(out, weights_only=True)
    # the format of `zoo scanpath train`'s model_best.pt; the table is in the weights, not a file name
    assert {"model", "model_kwargs", "max_len", "name"} <= saved.keys() and saved["max_len"] == 12
    assert "pos_table_file" not in saved["model_kwargs"] and saved["model"]["pos_table"].shape == (3, 12)
    model = zoo.create_model("oat", checkpoint_path=out, **saved["model_kwargs"])
    _check_logits(model, authors_files["sd"], np.load(authors_files["table"]))
