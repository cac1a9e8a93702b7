"""Efficient probing and its peers: parameter counts, EP's definition, and EP > linear probe on digits."""

from __future__ import annotations

import pytest
import torch

import zoo
import zoo.heads.probing as probing  # registers the probes until zoo.heads imports it
from zoo.train.probe import TokenCache, TokenCacheMismatchError, extract_tokens, load_image_data, train_probe


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # small ops on 2 shared cores: two threads spin against other jobs and run ~50x slower than one
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


PROBES = ["efficient_probe", "linear_probe_cls", "linear_probe_avg", "attentive_probe", "vjepa_probe"]
PROBES += ["aim_probe", "mha_probe", "abmil_probe", "simpool_probe", "map_probe"]


def _params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_ep_parameter_count_matches_the_original() -> None:
    # logs/mae_base/ep.txt of billpsomas/efficient-probing: "Trainable Parameters" for ViT-B, C=1000, Q=32
    probe = zoo.create_model("efficient_probe", embed_dim=768, num_classes=1000, num_queries=32)
    assert _params(probe) == 1_383_400 == probing.efficient_probe_param_count(768, 1000, 32)
    assert probe.pool_parameters() == 614_400
    assert not any(isinstance(m, torch.nn.LayerNorm) for m in probe.modules())
    assert probe.pool.v.bias is None and probe.norm.affine is False and probe.norm.eps == 1e-6
    assert _params(zoo.create_model("efficient_probe", embed_dim=768, num_classes=1000, d_out=2)) == (
        probing.efficient_probe_param_count(768, 1000, 32, d_out=2)
    )


def test_peer_pooling_sizes_at_vit_b() -> None:
    # spec: SimPool ~1.18 M, ABMIL-P ~2.9 M, AIM ~1.18 M, V-JEPA pooler ~7.1 M (pooling alone)
    D = 768
    sizes = {n: zoo.create_model(n, embed_dim=D, num_classes=1000).pool_parameters() for n in PROBES}
    assert sizes["linear_probe_cls"] == sizes["linear_probe_avg"] == 0
    assert sizes["simpool_probe"] == 2 * D * D + 2 * D == pytest.approx(1.18e6, rel=0.01)  # W_q, W_k (no bias), LN
    assert sizes["abmil_probe"] == 5 * D * D + 3 * D + 1 == pytest.approx(2.9e6, rel=0.03)  # qkv (no bias), proj, MLP
    assert sizes["aim_probe"] == 2 * D * D + D  # W_k, W_v (no bias), one query
    assert sizes["mha_probe"] == 4 * D * D + 4 * D + D  # q, kv, proj with bias, one query
    assert sizes["vjepa_probe"] == 12 * D * D + 14 * D == pytest.approx(7.1e6, rel=0.01)  # + 2 LN, MLP(4)
    assert sizes["map_probe"] == sizes["vjepa_probe"] - 2 * D  # timm's MAP: no LayerNorm on the tokens
    assert sizes["attentive_probe"] == sizes["vjepa_probe"] - 4 * D  # EP's siglip peer: no LayerNorm at all


def test_target_ratio_both_countings() -> None:
    # issue 8 target: EP <= 1/3 of the trainable parameters of the multi-head attentive probe (q/k/v/o)
    def both(name: str) -> tuple[int, int]:
        probe = zoo.create_model(name, embed_dim=768, num_classes=1000)
        return _params(probe), probe.pool_parameters()

    ep_total, ep_pool = both("efficient_probe")
    total, pool = both("attentive_probe")
    assert 3 * ep_total <= total and 3 * ep_pool <= pool  # 0.176 whole probe, 0.087 pooling alone
    mha_total, mha_pool = both("mha_probe")  # without the MLP only the pooling-alone count meets it
    assert ep_total / mha_total == pytest.approx(0.4417, abs=1e-4) and ep_pool / mha_pool == pytest.approx(
        0.26, abs=1e-3
    )


def test_peers_follow_their_references() -> None:
    from timm.layers import AttentionPoolLatent

    x = torch.randn(3, 11, 64)
    mapped = zoo.create_model("attentive_probe", embed_dim=64, num_classes=5).pool
    assert isinstance(mapped.attn_pool, AttentionPoolLatent)  # reused, not rewritten
    # EP's siglip peer: AttentionPoolLatent(in_features=D) keeps its defaults (8 heads, no norm); timm's ViT MAP
    assert mapped.attn_pool.num_heads == 8 and isinstance(mapped.attn_pool.norm, torch.nn.Identity)
    timm_map = zoo.create_model("map_probe", embed_dim=64, num_classes=5).pool.attn_pool
    assert timm_map.num_heads == 1 and isinstance(timm_map.norm, torch.nn.LayerNorm)  # heads of 64 channels
    vjepa = zoo.create_model("vjepa_probe", embed_dim=64, num_classes=5, num_heads=4).pool.eval()
    # V-JEPA CrossAttentionBlock by hand: q = u + proj(attn(W_q u, W_kv LN(x))); q = q + MLP(LN(q))
    u, xn = vjepa.query.expand(3, -1, -1), vjepa.norm1(x)
    q = vjepa.q(u).view(3, 1, 4, 16).transpose(1, 2)
    k, v = vjepa.kv(xn).view(3, 11, 2, 4, 16).permute(2, 0, 3, 1, 4)
    attn = (q @ k.transpose(-1, -2) / 4).softmax(-1)
    out = u + vjepa.proj((attn @ v).transpose(1, 2).reshape(3, 1, 64))
    out = out + vjepa.mlp(vjepa.norm2(out))
    torch.testing.assert_close(vjepa(x), out[:, 0])
    aim = zoo.create_model("aim_probe", embed_dim=64, num_classes=5, num_heads=4).pool
    assert aim.k.bias is None and aim.v.bias is None and not aim.bn.affine
    assert not hasattr(aim, "q") and not hasattr(aim, "proj")  # AIM: no q or output projection


@pytest.mark.parametrize("name", PROBES)
def test_shapes_and_kind(name: str) -> None:
    assert zoo.model_kind(name) == "probe"
    probe = zoo.create_model(name, embed_dim=64, num_classes=7, num_prefix_tokens=1).eval()
    assert probe(torch.randn(3, 17, 64)).shape == (3, 7)
    assert probe.forward_pool(torch.randn(3, 17, 64)).shape == (3, probe.num_features)
    with pytest.raises(RuntimeError, match="no pretrained weights"):
        zoo.create_model(name, pretrained=True)


def test_ep_definition() -> None:
    pool = zoo.create_model("efficient_probe", embed_dim=96, num_classes=3, num_queries=8).pool
    x = torch.randn(4, 20, 96, dtype=torch.float64)
    pool = pool.double()
    out = pool(x)
    assert out.shape == (4, 96)
    torch.testing.assert_close(out, pool.forward_reference(x))  # reordered product == original order
    # by hand: query j attends with softmax(U_j x^T / sqrt(D)) over its own slice of x W_V
    attn = (pool.queries @ x.transpose(1, 2) / 96**0.5).softmax(-1)
    values = x @ pool.v.weight.t()
    j = 5
    torch.testing.assert_close(
        out[:, 12 * j : 12 * (j + 1)], (attn[:, j : j + 1] @ values[..., 12 * j : 12 * (j + 1)])[:, 0]
    )
    maps = pool.attention(x)
    assert maps.shape == (4, 8, 20)
    torch.testing.assert_close(maps.sum(-1), torch.ones(4, 8, dtype=torch.float64))
    perm = torch.randperm(20)
    torch.testing.assert_close(pool(x[:, perm]), out)  # permutation invariant over tokens


def test_ep_errors_and_prefix_tokens() -> None:
    with pytest.raises(ValueError, match="divisible by num_queries"):
        zoo.create_model("efficient_probe", embed_dim=100, num_classes=3, num_queries=32)
    ep = zoo.create_model("efficient_probe", embed_dim=64, num_classes=3, num_prefix_tokens=1)
    ep_all = zoo.create_model(
        "efficient_probe", embed_dim=64, num_classes=3, num_prefix_tokens=1, use_prefix_tokens=True
    )
    x = torch.randn(2, 10, 64)
    assert ep.pool.attention(x).shape[-1] == 9 and ep_all.pool.attention(x).shape[-1] == 10
    with pytest.raises(ValueError, match="tokens"):
        ep(torch.randn(2, 64))
    with pytest.raises(ValueError, match="class-token probe needs"):
        zoo.create_model("linear_probe_cls", embed_dim=64, num_classes=3, num_prefix_tokens=0)


def test_attentive_probes_find_planted_tokens() -> None:
    # every token shows a class prototype; only the 2 marked tokens show the true class, so the mean of the
    # tokens mixes all classes while attention to the marker finds the answer
    g = torch.Generator().manual_seed(0)
    n, N, D, C = 512, 32, 32, 4
    labels = torch.randint(0, C, (n,), generator=g)
    prototypes = torch.randn(C, D, generator=g) * 2
    x = prototypes[torch.randint(0, C, (n, N), generator=g)] + 0.5 * torch.randn(n, N, D, generator=g)
    marker = torch.randn(D, generator=g) * 2
    x[:, :2] = prototypes[labels].unsqueeze(1) + marker + 0.5 * torch.randn(n, 2, D, generator=g)
    train, val = (x[:384], labels[:384]), (x[384:], labels[384:])
    ep = zoo.create_model("efficient_probe", embed_dim=D, num_classes=C, num_queries=4)
    gap = zoo.create_model("linear_probe_avg", embed_dim=D, num_classes=C)
    kw = dict(epochs=30, batch_size=64, opt="adamw", blr=0.02, warmup_epochs=1, verbose=False)
    ep_acc = train_probe(ep, train, val, **kw)["best_top1"]
    gap_acc = train_probe(gap, train, val, **kw)["best_top1"]
    assert ep_acc > gap_acc + 10, (ep_acc, gap_acc)
    on_planted = ep.pool.attention(val[0])[..., :2].sum(-1).mean(0)  # (Q,) attention mass on the 2 tokens
    assert on_planted.min() > 3 * 2 / 32, on_planted  # every query: > 3x the uniform share 2 / 32


@pytest.fixture(scope="module")
def digit_tokens() -> dict:
    """Tokens of a frozen, randomly initialised 4-block ViT-Tiny (no weights offline) on digits at 32 px."""
    torch.manual_seed(0)
    data = load_image_data("digits", 32)
    backbone = zoo.create_model("vit_tiny_patch16_224", img_size=32, patch_size=4, depth=4, num_classes=0).eval()
    train = (extract_tokens(backbone, data["train"][0][:700]), data["train"][1][:700])
    val = (extract_tokens(backbone, data["val"][0]), data["val"][1])
    return dict(train=train, val=val, backbone=backbone, images=data)


def test_ep_beats_linear_probes_on_digits(digit_tokens: dict) -> None:
    kw = dict(epochs=12, batch_size=128, opt="adamw", blr=2e-3, warmup_epochs=1, verbose=False)
    acc = {}
    for name in ("efficient_probe", "linear_probe_cls", "linear_probe_avg"):
        probe = zoo.create_model(name, embed_dim=192, num_classes=10, num_prefix_tokens=1)
        acc[name] = train_probe(probe, digit_tokens["train"], digit_tokens["val"], **kw)["best_top1"]
    assert acc["efficient_probe"] > max(acc["linear_probe_cls"], acc["linear_probe_avg"]) + 5, acc


def test_token_cache_resumes_and_rejects_other_backbones(tmp_path, digit_tokens: dict) -> None:
    images, labels = digit_tokens["images"]["val"]
    data = {"val": (images[:40], labels[:40])}
    meta = dict(backbone="vit_tiny_patch16_224", feature_dim=192, num_tokens=65, img_size=32, data="digits",
                chunk_size=16, splits={"val": 40})  # fmt: skip
    cache = TokenCache(tmp_path / "cache")
    assert cache.build(digit_tokens["backbone"], meta, data) == {"val": 3}
    cache.chunk_path("val", 1).unlink()  # an interrupted run: one chunk missing
    first = cache.chunk_path("val", 0).stat().st_mtime_ns
    assert cache.build(digit_tokens["backbone"], meta, data) == {"val": 1}
    assert cache.chunk_path("val", 0).stat().st_mtime_ns == first
    tokens, got = cache.load("val", "vit_tiny_patch16_224")
    assert tokens.shape == (40, 65, 192) and torch.equal(got, labels[:40])
    torch.testing.assert_close(tokens[:20], digit_tokens["val"][0][:20])
    with pytest.raises(TokenCacheMismatchError, match="vit_tiny_patch16_224.*not 'resnet18'"):
        cache.build(digit_tokens["backbone"], dict(meta, backbone="resnet18", feature_dim=512), data)
    with pytest.raises(TokenCacheMismatchError, match="resnet18"):
        cache.load("val", "resnet18")
    try:  # the errors name the cache folder, the record at fault
        cache.load("val", "resnet18")
    except TokenCacheMismatchError as err:
        assert str(tmp_path / "cache") in str(err)
    chunk = torch.load(cache.chunk_path("val", 2))
    torch.save(dict(chunk, tokens=torch.zeros(8, 65, 512)), cache.chunk_path("val", 2))  # another backbone's chunk
    with pytest.raises(TokenCacheMismatchError, match=r"chunk_00002\.pt holds 512-dim tokens"):
        cache.load("val")
    cache.chunk_path("val", 1).unlink()
    with pytest.raises(TokenCacheMismatchError, match=r"incomplete: .*chunk_00001\.pt is missing"):
        cache.load("val")


def test_train_probe_resumes_exactly(tmp_path, digit_tokens: dict) -> None:
    kw = dict(epochs=4, batch_size=256, opt="lars", blr=0.1, warmup_epochs=1, verbose=False, seed=3)
    train, val = digit_tokens["train"], digit_tokens["val"]
    full = train_probe(zoo.create_model("efficient_probe", embed_dim=192, num_classes=10), train, val, **kw)
    torch.manual_seed(0)  # same init as the first run
    probe = zoo.create_model("efficient_probe", embed_dim=192, num_classes=10)
    train_probe(probe, train, val, **kw, out_dir=tmp_path / "run", stop_epoch=2)  # pre-empted after 2 epochs
    assert (tmp_path / "run" / "metrics.csv").is_file()
    probe = zoo.create_model("efficient_probe", embed_dim=192, num_classes=10)  # fresh weights, then resume
    resumed = train_probe(probe, train, val, **kw, out_dir=tmp_path / "run", resume="auto")
    assert [r["val_top1"] for r in resumed["history"]] == [r["val_top1"] for r in full["history"]]
    assert [r["train_loss"] for r in resumed["history"]] == pytest.approx([r["train_loss"] for r in full["history"]])
