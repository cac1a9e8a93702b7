"""Probe heads trained with the authors' code (billpsomas/efficient-probing@b8f4fb84) load as they are saved.

Each case writes a head in the EP repository's layout (``model.head = Sequential(pool, BatchNorm1d, Linear)``;
key names and shapes copied from its ``poolings/`` modules and ``probe_heads.py``; seeded random values), saves
it the ways the repository does, loads it through both of zoo's routes and checks the logits against the pooling
equations recomputed here by hand, in float64, from the raw tensors of the file (tolerance: 1e-5 absolute and
relative, float32 model vs float64 reference).
"""

from __future__ import annotations

import argparse
import csv
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import zoo
import zoo.heads.probing as probing
from zoo.train import probe as probe_cli

D, C, N, B, Q, H = 32, 5, 6, 3, 4, 4  # width, classes, patch tokens, batch, EP queries, heads of the MHA peers
TOL = dict(atol=1e-5, rtol=1e-5)

# EP-repo --cls_features flag -> (zoo entry, its keywords); jepa_bare is V-JEPA's AttentivePooler(complete_block=False)
ENTRIES = {
    "ep": ("efficient_probe", dict(num_queries=Q)),
    "ep_d2": ("efficient_probe", dict(num_queries=Q, d_out=2)),
    "ep_all": ("efficient_probe", dict(num_queries=Q, use_prefix_tokens=True)),
    "siglip": ("attentive_probe", {}),
    "jepa": ("vjepa_probe", dict(num_heads=H)),
    "jepa_bare": ("mha_probe", dict(num_heads=H)),
    "aim": ("aim_probe", dict(num_heads=H)),
    "abmilp": ("abmil_probe", {}),
    "abmilp_all": ("abmil_probe", dict(use_prefix_tokens=True)),
    "simpool": ("simpool_probe", {}),
    "cls": ("linear_probe_cls", {}),
    "pos": ("linear_probe_avg", {}),
}

# Trainable parameters of the authors' whole head (pooling + classifier) at D=768, C=1000, counted on their modules
# (b8f4fb84: probe_heads.build_probe_head, --ep_queries 32, --num_heads 16) in /tmp, outside the project.
AUTHORS_PARAMS_768 = {
    "efficient_probe": 1_383_400,  # also "Trainable Parameters" in logs/mae_base/ep.txt
    "attentive_probe": 7_854_568,
    "vjepa_probe": 7_857_640,
    "mha_probe": 3_132_136,
    "aim_probe": 1_949_416,
    "abmil_probe": 3_720_425,
    "simpool_probe": 1_950_184,
    "linear_probe_cls": 769_000,
    "linear_probe_avg": 769_000,
}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _pool_shapes(flag: str) -> dict[str, tuple[int, ...]]:
    """The authors' pooling state dict: key -> shape, as their modules name them."""
    base = flag.removesuffix("_all")
    if base in ("ep", "ep_d2"):  # poolings/ep.py EfficientProbing: queries 'cls_token', bias-free W_V
        return {"cls_token": (1, Q, D), "v.weight": (D // (2 if base == "ep_d2" else 1), D)}
    if base == "siglip":  # poolings/clip/attention_pool.py AttentionPoolLatent(in_features=D): no norm_layer
        return {"latent": (1, 1, D), "q.weight": (D, D), "q.bias": (D,), "kv.weight": (2 * D, D), "kv.bias": (2 * D,),
                "proj.weight": (D, D), "proj.bias": (D,), "mlp.fc1.weight": (4 * D, D), "mlp.fc1.bias": (4 * D,),
                "mlp.fc2.weight": (D, 4 * D), "mlp.fc2.bias": (D,)}  # fmt: skip
    if base in ("jepa", "jepa_bare"):  # poolings/jepa/attentive_pooler.py AttentivePooler
        x = "cross_attention_block." + ("xattn." if base == "jepa" else "")
        shapes = {"query_tokens": (1, 1, D), f"{x}q.weight": (D, D), f"{x}q.bias": (D,), f"{x}kv.weight": (2 * D, D),
                  f"{x}kv.bias": (2 * D,), f"{x}proj.weight": (D, D), f"{x}proj.bias": (D,)}  # fmt: skip
        if base == "jepa":  # CrossAttentionBlock: norm1, xattn, norm2, mlp
            blk = "cross_attention_block."
            shapes |= {f"{blk}norm1.weight": (D,), f"{blk}norm1.bias": (D,), f"{blk}norm2.weight": (D,),
                       f"{blk}norm2.bias": (D,), f"{blk}mlp.fc1.weight": (4 * D, D), f"{blk}mlp.fc1.bias": (4 * D,),
                       f"{blk}mlp.fc2.weight": (D, 4 * D), f"{blk}mlp.fc2.bias": (D,)}  # fmt: skip
        return shapes
    if base == "aim":  # poolings/aim.py AttentionPoolingClassifier: non-affine BN inside, bias-free W_k / W_v
        return {"k.weight": (D, D), "v.weight": (D, D), "cls_token": (1, 1, D), "bn.running_mean": (D,),
                "bn.running_var": (D,), "bn.num_batches_tracked": ()}  # fmt: skip
    if base == "abmilp":  # poolings/abmilp.py ABMILPHead: models_vit.Attention(D, num_heads=1) (qkv_bias=False)
        return {"self_attn.qkv.weight": (3 * D, D), "self_attn.proj.weight": (D, D), "self_attn.proj.bias": (D,),
                "attention_predictor.0.weight": (D, D), "attention_predictor.0.bias": (D,),
                "attention_predictor.2.weight": (1, D), "attention_predictor.2.bias": (1,)}  # fmt: skip
    if base == "simpool":  # poolings/simpool.py SimPool(num_heads=1, qkv_bias=False)
        return {"norm_patches.weight": (D,), "norm_patches.bias": (D,), "wq.weight": (D, D), "wk.weight": (D, D)}
    return {}  # cls / pos: plain linear probe, no pooling module


def _random(key: str, shape: tuple[int, ...], g: torch.Generator) -> torch.Tensor:
    if key.endswith("num_batches_tracked"):
        return torch.tensor(1234)
    if key.endswith("running_var"):
        return 0.5 + torch.rand(shape, generator=g)
    if key.endswith("running_mean") or key.endswith("bias"):
        return 0.1 * torch.randn(shape, generator=g)
    if len(shape) == 1:  # LayerNorm weights
        return 1 + 0.1 * torch.randn(shape, generator=g)
    if "token" in key or key == "latent":
        return torch.randn(shape, generator=g)
    return torch.randn(shape, generator=g) / math.sqrt(shape[-1])


def authors_head(flag: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """``model.head.state_dict()`` of the EP repository for ``--cls_features flag`` (seeded random values)."""
    g = torch.Generator().manual_seed(seed)
    pool = _pool_shapes(flag)
    width = D // 2 if flag == "ep_d2" else D  # EP's classifier is D / d_out wide
    norm, fc = ("1.", "2.") if pool else ("0.", "1.")  # Sequential(pool, BN, Linear) or Sequential(BN, Linear)
    shapes = {f"0.{k}": s for k, s in pool.items()}
    shapes |= {f"{norm}running_mean": (width,), f"{norm}running_var": (width,), f"{norm}num_batches_tracked": ()}
    shapes |= {f"{fc}weight": (C, width), f"{fc}bias": (C,)}
    return {k: _random(k, s, g) for k, s in shapes.items()}


def _tokens() -> torch.Tensor:
    """(B, 1 + N, D): a [CLS] token, then N patch tokens."""
    return torch.randn(B, 1 + N, D, generator=torch.Generator().manual_seed(7))


# ----------------------------------------------------------------------- the equations, by hand (float64)


def _softmax_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """Multi-head attention of queries (B, L, D) on keys / values (B, N, D): (B, L, D), heads concatenated."""
    split = lambda t: t.unflatten(-1, (heads, -1)).transpose(1, 2)  # (B, heads, *, D / heads)
    q, k, v = split(q), split(k), split(v)
    attn = (q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])).softmax(-1)
    return (attn @ v).transpose(1, 2).flatten(2)


def expected_logits(flag: str, sd: dict[str, torch.Tensor], tokens: torch.Tensor) -> torch.Tensor:
    """The authors' forward for ``flag`` on ``tokens`` (B, 1 + N, D), written from their code: (B, C)."""
    w = {k: v.double() for k, v in sd.items()}
    p = {k[2:]: v for k, v in w.items() if k.startswith("0.")}
    x = tokens.double() if flag.endswith("_all") else tokens[:, 1:].double()  # `_all`: [CLS] and patches
    base = flag.removesuffix("_all")
    if base in ("ep", "ep_d2"):  # softmax_N(U x^T / sqrt(D)) per query over its own slice of x W_V; concatenated
        attn = (p["cls_token"][0] @ x.transpose(1, 2) / math.sqrt(D)).softmax(-1)  # (B, Q, N)
        values = (x @ p["v.weight"].t()).unflatten(-1, (Q, -1))  # (B, N, Q, D / (d_out Q))
        pooled = torch.einsum("bqn,bnqc->bqc", attn, values).flatten(1)
    elif base == "siglip":  # q(latent), kv(x), 8 heads, proj, x + mlp(x) (no norm), token 0
        q = p["latent"].expand(len(x), -1, -1) @ p["q.weight"].t() + p["q.bias"]
        kv = x @ p["kv.weight"].t() + p["kv.bias"]
        y = _softmax_attention(q, kv[..., :D], kv[..., D:], 8) @ p["proj.weight"].t() + p["proj.bias"]
        hidden = F.gelu(y @ p["mlp.fc1.weight"].t() + p["mlp.fc1.bias"])
        pooled = (y + hidden @ p["mlp.fc2.weight"].t() + p["mlp.fc2.bias"])[:, 0]
    elif base in ("jepa", "jepa_bare"):  # V-JEPA: q = u + proj(attn(q(u), kv(LN1 x))); q = q + mlp(LN2 q)
        blk = "cross_attention_block."
        x_ = blk + ("xattn." if base == "jepa" else "")
        u = p["query_tokens"].expand(len(x), -1, -1)
        xn = F.layer_norm(x, (D,), p[blk + "norm1.weight"], p[blk + "norm1.bias"]) if base == "jepa" else x
        kv = xn @ p[x_ + "kv.weight"].t() + p[x_ + "kv.bias"]
        q = u @ p[x_ + "q.weight"].t() + p[x_ + "q.bias"]
        y = _softmax_attention(q, kv[..., :D], kv[..., D:], H) @ p[x_ + "proj.weight"].t() + p[x_ + "proj.bias"]
        if base == "jepa":
            y = u + y
            yn = F.layer_norm(y, (D,), p[blk + "norm2.weight"], p[blk + "norm2.bias"])
            hidden = F.gelu(yn @ p[blk + "mlp.fc1.weight"].t() + p[blk + "mlp.fc1.bias"])
            y = y + hidden @ p[blk + "mlp.fc2.weight"].t() + p[blk + "mlp.fc2.bias"]
        pooled = y[:, 0]
    elif base == "aim":  # BN(x) (eval: running stats, eps 1e-6), the query itself as q, W_k, W_v, mean over queries
        xb = (x - p["bn.running_mean"]) / torch.sqrt(p["bn.running_var"] + 1e-6)
        q = p["cls_token"].expand(len(x), -1, -1)
        pooled = _softmax_attention(q, xb @ p["k.weight"].t(), xb @ p["v.weight"].t(), H).mean(1)
    elif base == "abmilp":  # abmilp_sa='both': one self-attention head gives the weights AND the pooled tokens
        q, k, v = (x @ p["self_attn.qkv.weight"].t()).chunk(3, dim=-1)
        sa = (q @ k.transpose(1, 2) / math.sqrt(D)).softmax(-1) @ v @ p["self_attn.proj.weight"].t()
        sa = sa + p["self_attn.proj.bias"]
        hidden = torch.tanh(sa @ p["attention_predictor.0.weight"].t() + p["attention_predictor.0.bias"])
        weights = (hidden @ p["attention_predictor.2.weight"].t() + p["attention_predictor.2.bias"]).softmax(1)
        pooled = (weights * sa).sum(1)
    elif base == "simpool":  # query W_q GAP(raw x); keys W_k LN(x); values LN(x)
        xn = F.layer_norm(x, (D,), p["norm_patches.weight"], p["norm_patches.bias"], eps=1e-6)
        q = x.mean(1, keepdim=True) @ p["wq.weight"].t()
        pooled = ((q @ (xn @ p["wk.weight"].t()).transpose(1, 2)) / math.sqrt(D)).softmax(-1) @ xn
        pooled = pooled[:, 0]
    elif base == "cls":
        pooled = tokens[:, 0].double()
    else:  # pos: GAP of the patch tokens
        pooled = tokens[:, 1:].double().mean(1)
    norm, fc = ("1.", "2.") if "2.weight" in w else ("0.", "1.")
    normed = (pooled - w[norm + "running_mean"]) / torch.sqrt(w[norm + "running_var"] + 1e-6)  # BN, eps 1e-6
    return normed @ w[fc + "weight"].t() + w[fc + "bias"]


# ----------------------------------------------------------------------------------------------- saving


def save_probing_run(sd: dict[str, torch.Tensor], path: Path, saved_module: str = "head") -> Path:
    """As util/misc.py save_model writes checkpoint-*.pth. Its args here hold plain values only: a real run's
    args.data_path is a pathlib.Path, which zoo's weights-only reader refuses (the file must be re-saved)."""
    args = argparse.Namespace(cls_features="ep", ep_queries=Q, d_out=1, model="vit_base_patch16", blr=0.1)
    torch.save(
        {"saved_module": saved_module, "model": sd, "optimizer": {"state": {}, "param_groups": [{"lr": 1.6}]},
         "epoch": 7, "scaler": {"scale": 65536.0, "growth_factor": 2.0}, "args": args,
         "test_stats": {"test_acc1": 75.46, "epoch": 7}},
        path,
    )  # fmt: skip
    return path


def save_export(sd: dict[str, torch.Tensor], path: Path) -> Path:
    """As tools/export_ep_heads.py writes ep_head.pth: the head's state dict under 'state_dict', plus metadata."""
    torch.save({"state_dict": sd, "meta": {"cls_features": "ep", "model": "vit_base_patch16", "head_epoch": 7}}, path)
    return path


def whole_model(head: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A --finetuning run's model: an MAE-style ViT's keys (its own cls_token and final norm among them) + head.*."""
    g = torch.Generator().manual_seed(3)
    backbone = {"cls_token": (1, 1, D), "pos_embed": (1, 1 + N, D), "patch_embed.proj.weight": (D, 3, 4, 4),
                "patch_embed.proj.bias": (D,), "blocks.0.attn.qkv.weight": (3 * D, D), "blocks.0.norm1.weight": (D,),
                "norm.weight": (D,), "norm.bias": (D,)}  # fmt: skip
    weights = {k: torch.randn(s, generator=g) for k, s in backbone.items()}
    return weights | {f"head.{k}": v for k, v in head.items()}


def _ep(**overrides) -> dict:
    return dict(embed_dim=D, num_classes=C, num_queries=Q) | overrides


def _load_both_routes(name: str, path: Path, **kwargs) -> list[torch.nn.Module]:
    return [
        zoo.create_model(name, checkpoint_path=path, **kwargs).eval(),
        zoo.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), **kwargs).eval(),
    ]


# ------------------------------------------------------------------------------------------------ tests


@pytest.mark.parametrize("flag", list(ENTRIES))
def test_authors_heads_load_as_saved_and_match_their_equations(flag: str, tmp_path: Path) -> None:
    name, kwargs = ENTRIES[flag]
    kwargs = dict(embed_dim=D, num_classes=C, num_prefix_tokens=1, **kwargs)
    sd = authors_head(flag)
    tokens = _tokens()
    expected = expected_logits(flag, sd, tokens)
    files = [
        save_probing_run(sd, tmp_path / "checkpoint-best.pth"),  # a probing run: the head alone, under 'model'
        save_export(sd, tmp_path / "ep_head.pth"),  # the release format, under 'state_dict'
        save_probing_run(whole_model(sd), tmp_path / "checkpoint-ft.pth", "full"),  # backbone + head.*
    ]
    for path in files:
        for model in _load_both_routes(name, path, **kwargs):
            with torch.no_grad():
                torch.testing.assert_close(model(tokens).double(), expected, **TOL, msg=f"{flag}: {path.name}")
    # every tensor of the file arrives (none dropped by the filter): the parameter count is the authors'
    params = sum(v.numel() for k, v in sd.items() if "running_" not in k and "num_batches" not in k)
    assert sum(p.numel() for p in model.parameters()) == params


@pytest.mark.parametrize("name", list(AUTHORS_PARAMS_768))
def test_parameter_counts_equal_the_authors(name: str) -> None:
    kwargs = dict(num_heads=16) if name in ("vjepa_probe", "mha_probe", "aim_probe") else {}  # EP's --num_heads
    probe = zoo.create_model(name, embed_dim=768, num_classes=1000, **kwargs)
    assert sum(p.numel() for p in probe.parameters() if p.requires_grad) == AUTHORS_PARAMS_768[name]
    if name == "efficient_probe":
        assert probing.efficient_probe_param_count(768, 1000, 32) == 1_383_400


def test_filter_is_idempotent_on_zoo_layout() -> None:
    for name, kwargs in ENTRIES.values():
        model = zoo.create_model(name, embed_dim=D, num_classes=C, num_prefix_tokens=1, **kwargs)
        own = model.state_dict()
        assert probing.checkpoint_filter_fn(own, model) is own  # zoo's layout passes untouched
    model = zoo.create_model("efficient_probe", **_ep())
    mapped = probing.checkpoint_filter_fn(authors_head("ep"), model)
    assert probing.checkpoint_filter_fn(mapped, model) is mapped
    assert mapped["pool.queries"].shape == (Q, D) and set(mapped) == set(model.state_dict())


def test_filter_names_the_probe_and_sizes_to_build(tmp_path: Path) -> None:
    path = save_export(authors_head("simpool"), tmp_path / "simpool.pth")
    with pytest.raises(ValueError, match=r"'simpool' probe head.*create_model\('simpool_probe', embed_dim=32"):
        zoo.create_model("efficient_probe", checkpoint_path=path, **_ep())
    path = save_export(authors_head("ep"), tmp_path / "ep.pth")
    with pytest.raises(ValueError, match=r"embed_dim=32, num_queries=4, num_classes=5"):
        zoo.create_model("efficient_probe", checkpoint_path=path, **_ep(num_queries=8))
    with pytest.raises(ValueError, match=r"'cls / pos' probe head.*linear_probe_cls"):
        zoo.create_model("efficient_probe", checkpoint_path=save_export(authors_head("pos"), tmp_path / "lp.pth"))
    esimpool = {"0.norm_patches.weight": torch.ones(D), "0.norm_patches.bias": torch.zeros(D)}
    esimpool |= {k: v for k, v in authors_head("ep").items() if not k.startswith("0.")}
    with pytest.raises(ValueError, match="pooling zoo does not implement"):
        zoo.create_model("simpool_probe", checkpoint_path=save_export(esimpool, tmp_path / "e"), embed_dim=D)


def test_zoo_probe_checkpoint_loads_through_checkpoint_path(tmp_path: Path) -> None:
    """A `zoo probe` run's checkpoint ({'model': ..., 'optimizer': ..., ...}) rebuilds the probe it saved."""
    parser = argparse.ArgumentParser(prog="zoo")
    probe_cli.add_cli(parser.add_subparsers(dest="command", required=True))
    argv = [
        "probe", "--backbone", "vit_tiny_patch16_224", "--backbone-kwargs",
        '{"img_size": 16, "patch_size": 4, "depth": 1}', "--img-size", "16", "--probes", "efficient_probe",
        "simpool_probe", "--epochs", "2", "--warmup-epochs", "1", "--batch-size", "512", "--chunk-size", "1024",
        "--cache", str(tmp_path / "cache"), "--out", str(tmp_path / "out"),
    ]  # fmt: skip
    args = parser.parse_args(argv)
    assert args.func(args) == 0
    best = {r["probe"]: float(r["best_top1"]) for r in csv.DictReader(open(tmp_path / "out" / "summary.csv"))}
    val_tokens, val_labels = probe_cli.TokenCache(tmp_path / "cache").load("val", "vit_tiny_patch16_224")
    for name in ("efficient_probe", "simpool_probe"):
        path = tmp_path / "out" / name / "ckpt_best.pt"
        saved = torch.load(path)["model"]
        for model in _load_both_routes(name, path, embed_dim=192, num_classes=10, num_prefix_tokens=1):
            assert all(torch.equal(v, saved[k]) for k, v in model.state_dict().items())
            assert probe_cli.evaluate(model, val_tokens, val_labels) == pytest.approx(best[name])
