"""MIL heads: ACMIL's masking and loss pinned to the spec, peers' padding semantics, learning on real digits."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

import zoo
import zoo.heads.mil as mil  # explicit until zoo.heads imports it


@pytest.fixture(autouse=True)
def _one_thread():
    # tiny ops: on shared, loaded cores a second intra-op thread makes each step ~8x slower
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


HEADS = ["mean_mil", "max_mil", "abmil", "acmil", "clam_sb_mil", "clam_mb_mil", "transmil"]


def test_registered_names() -> None:
    names = zoo.list_models("*mil*")
    assert set(HEADS) <= set(names)
    assert all("mil" in n for n in zoo.list_models(kind="mil_head"))
    head = zoo.create_model("acmil", in_dim=512, num_classes=2)
    # spec: ResNet-18 features, C=2, M=5 -> about 0.20 M parameters
    assert abs(sum(p.numel() for p in head.parameters()) - 200_593) == 0
    with pytest.raises(RuntimeError, match="pretrained weights"):
        zoo.create_model("acmil", pretrained=True)


def _raw_logits(head: mil.ACMIL, x: torch.Tensor) -> torch.Tensor:
    return head.attention(head.reduce(x))


def test_stkim_masks_exactly_6_of_top10_per_branch_in_training_only() -> None:
    head = mil.ACMIL(in_dim=16, num_classes=2)
    assert (head.num_branches, head.mask_k, head.mask_drop) == (5, 10, 0.6)
    x = torch.randn(3, 40, 16)
    raw = _raw_logits(head, x)
    for _ in range(3):  # random subsets differ between calls; the count never does
        out = head.train()(x)
        masked = out["attention_logits"]
        hidden = masked == -1e9
        assert hidden.sum(-1).eq(6).all()  # exactly floor(10 * 0.6) per bag and branch
        top10 = torch.zeros_like(hidden).scatter_(-1, raw.topk(10, dim=-1).indices, True)
        assert not (hidden & ~top10).any()  # only top-10 instances are hidden
        torch.testing.assert_close(masked[~hidden], raw[~hidden].float())
        assert out["attention"][hidden].abs().max() == 0
    out = head.eval()(x)
    assert not (out["attention_logits"] == -1e9).any()
    torch.testing.assert_close(out["attention_logits"], raw)


def test_stkim_respects_padding_and_short_bags() -> None:
    logits = torch.randn(2, 5, 12)
    mask = torch.ones(2, 12, dtype=torch.bool)
    mask[1, 4:] = False  # 4 real instances in bag 1
    hide = mil.stochastic_topk_mask(logits, mask, k=10, drop=0.6)
    assert hide[0].sum(-1).eq(6).all()
    assert not hide[1, :, 4:].any()
    # k larger than N: k clips to N (8 -> floor(8 * 0.6) = 4)
    assert mil.stochastic_topk_mask(torch.randn(1, 2, 8), torch.ones(1, 8, dtype=torch.bool), 10, 0.6).sum() == 8
    assert mil.stochastic_topk_mask(logits, mask, k=10, drop=0.0).sum() == 0


def test_slide_attention_is_mean_of_branch_softmaxes() -> None:
    head = mil.ACMIL(in_dim=16, num_classes=3).eval()
    x = torch.randn(2, 30, 16)
    out = head(x)
    a = torch.softmax(_raw_logits(head, x), dim=-1)
    torch.testing.assert_close(out["attention"], a)
    torch.testing.assert_close(out["slide_attention"], a.mean(1))
    h = head.reduce(x)
    torch.testing.assert_close(out["logits"], head.classifier(torch.einsum("bn,bnd->bd", a.mean(1), h)))
    for m in range(5):
        torch.testing.assert_close(out["aux_logits"][:, m], head.branch_classifiers[m](torch.bmm(a, h)[:, m]))


def test_acmil_loss_terms() -> None:
    head = mil.ACMIL(in_dim=16, num_classes=3).train()
    x, y = torch.randn(2, 30, 16), torch.tensor([2, 0])
    out = head(x)
    terms = head.loss(out, y)
    a = out["attention"]
    div = torch.stack(
        [F.cosine_similarity(a[b, i], a[b, j], dim=0) for b in range(2) for i, j in itertools.combinations(range(5), 2)]
    ).mean()
    torch.testing.assert_close(terms["diversity"], div)
    branch_ce = torch.stack([F.cross_entropy(out["aux_logits"][:, m], y) for m in range(5)]).mean()
    torch.testing.assert_close(terms["branch_ce"], branch_ce)
    torch.testing.assert_close(terms["ce"], F.cross_entropy(out["logits"], y))
    torch.testing.assert_close(terms["loss"], terms["ce"] + branch_ce + div)  # all weights 1
    single = mil.ACMIL(in_dim=16, num_classes=3, num_branches=1)
    t1 = single.loss(single(x), y)
    assert "branch_ce" not in t1 and float(t1["diversity"]) == 0.0  # M = 1: no branch CE, no pairs


def test_acmil_one_branch_no_masking_equals_gated_abmil() -> None:
    acmil = mil.ACMIL(in_dim=16, num_classes=2, num_branches=1, mask_k=0).train()
    abmil = mil.ABMIL(in_dim=16, num_classes=2, dim=acmil.dim).train()
    abmil.load_state_dict({k: v for k, v in acmil.state_dict().items() if not k.startswith("branch")})
    x = torch.randn(2, 25, 16)
    torch.testing.assert_close(acmil(x)["logits"], abmil(x)["logits"])
    torch.testing.assert_close(acmil(x)["attention"], abmil(x)["attention"])


@pytest.mark.parametrize("name", HEADS)
def test_padding_equals_unpadded_bags(name: str) -> None:
    head = zoo.create_model(name, in_dim=16, num_classes=2).eval()
    bags = [torch.randn(20, 16), torch.randn(13, 16)]
    padded = torch.zeros(2, 20, 16)
    mask = torch.zeros(2, 20, dtype=torch.bool)
    for b, bag in enumerate(bags):
        padded[b, : len(bag)], mask[b, : len(bag)] = bag, True
    out = head(padded, mask=mask)
    assert out["attention"][1, :, 13:].abs().max() == 0
    for b, bag in enumerate(bags):
        single = head(bag)
        torch.testing.assert_close(out["logits"][b], single["logits"][0], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(out["attention"][b, :, : len(bag)], single["attention"][0], atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("name", HEADS)
def test_bad_input_is_named(name: str) -> None:
    head = zoo.create_model(name, in_dim=16, num_classes=2)
    with pytest.raises(ValueError, match="16-d instance features but got 24-d"):
        head(torch.randn(5, 24))
    with pytest.raises(ValueError, match="no real instance"):
        head(torch.randn(2, 5, 16), mask=torch.tensor([[True] * 5, [False] * 5]))


def test_float16_and_long_bags() -> None:
    head = mil.ACMIL(in_dim=64, num_classes=2).eval()
    with torch.no_grad():
        out = head(torch.randn(50_000, 64).half())
    assert out["logits"].dtype == torch.float32 and torch.isfinite(out["logits"]).all()
    torch.testing.assert_close(out["attention"].sum(-1), torch.ones(1, 5))


def _digit_bags(n_bags: int, gen: torch.Generator, images: torch.Tensor, targets: torch.Tensor):
    """MNIST-bags style on sklearn digits: 6-12 real digits per bag, positive iff a 9 is in it."""
    bags, labels = [], []
    for i in range(n_bags):
        n = int(torch.randint(6, 13, (1,), generator=gen))
        idx = torch.randint(0, len(images), (n,), generator=gen)
        nines = (targets[idx] == 9).nonzero().flatten()
        want_positive = i % 2 == 0
        if want_positive and len(nines) == 0:
            idx[0] = (
                (targets == 9)
                .nonzero()
                .flatten()[int(torch.randint(0, int((targets == 9).sum()), (1,), generator=gen))]
            )
        if not want_positive:
            idx = idx[targets[idx] != 9]
            if len(idx) == 0:
                continue
        bags.append(images[idx])
        labels.append(int((targets[idx] == 9).any()))
    return bags, torch.tensor(labels)


def test_acmil_learns_digit_bags() -> None:
    from sklearn.datasets import load_digits
    from sklearn.metrics import roc_auc_score

    digits = load_digits()
    images = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    targets = torch.tensor(digits.target)
    train_x, train_t, test_x, test_t = images[:1200], targets[:1200], images[1200:], targets[1200:]
    gen = torch.Generator().manual_seed(0)
    train_bags, train_y = _digit_bags(160, gen, train_x, train_t)
    test_bags, test_y = _digit_bags(80, gen, test_x, test_t)
    head = mil.ACMIL(in_dim=64, num_classes=2)
    opt = torch.optim.AdamW(head.parameters(), lr=2e-3, weight_decay=1e-5)
    batches = [(train_bags[i : i + 4], train_y[i : i + 4]) for i in range(0, len(train_bags), 4)]
    for _ in range(8):
        head.train()
        for bags, y in batches:  # padded mini-batches of 4 bags (the mask path), not ACMIL's B = 1
            feats = torch.nn.utils.rnn.pad_sequence(bags, batch_first=True)
            mask = torch.nn.utils.rnn.pad_sequence([torch.ones(len(b), dtype=torch.bool) for b in bags], True)
            loss = head.loss(head(feats, mask=mask), y)["loss"]
            opt.zero_grad()
            loss.backward()
            opt.step()
    head.eval()
    with torch.no_grad():
        scores = torch.cat([torch.softmax(head(bag)["logits"], -1)[:, 1] for bag in test_bags])
    auc = roc_auc_score(test_y.numpy(), scores.numpy())
    assert auc > 0.85, auc
