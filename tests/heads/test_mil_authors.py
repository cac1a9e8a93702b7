"""Authors' MIL checkpoints load as they are saved, and zoo's defaults compute the authors' forward.

For every family the test writes a state dict with the authors' exact key names and shapes (copied below from
their code, commits in ``zoo.heads.mil.FAMILY['references']``), filled with seeded random values, saves it as
their training scripts do (ACMIL: ``{'model': ..., 'optimizer': ..., 'epoch': ...}`` or bare; CLAM: bare, with
CLAM's DataParallel / smooth-SVM keys as in its published demo checkpoint; TransMIL: a PyTorch Lightning
``{'state_dict': {'model.<key>': ...}}``), loads it through both factory routes and compares the outputs with
the equations recomputed here from the raw tensors. Tolerance: 1e-5 absolute on logits (float32 against a
float64 recomputation).

Parameter counts were obtained by instantiating the authors' classes in a separate environment (their model
files imported directly, torch only) and summing ``p.numel()`` over ``model.parameters()``.
"""

from __future__ import annotations

import math
import socket
import sys
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import zoo
import zoo.heads.mil as mil

ATOL = 1e-5


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _fill(shapes: dict[str, tuple[int, ...]], seed: int, scale: float = 0.05) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(shape, generator=g) * scale for k, shape in shapes.items()}


def _both_routes(name: str, payload: object, tmp_path: Path, **kwargs) -> list[torch.nn.Module]:
    """The head loaded through ``checkpoint_path=`` and through ``pretrained=True`` with a file overlay."""
    path = tmp_path / f"{name}_authors.pth"
    torch.save(payload, path)
    by_checkpoint = zoo.create_model(name, checkpoint_path=path, **kwargs)
    by_file = zoo.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), **kwargs)
    return [by_checkpoint.eval(), by_file.eval()]


def _n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# --------------------------------------------------------------------------------------------------
# ACMIL and ABMIL (dazhangyu123/ACMIL architecture/transformer.py, network.py)


def acmil_ga_shapes(d_feat: int, d_inner: int, n_class: int, n_token: int) -> dict[str, tuple[int, ...]]:
    """``ACMIL_GA(conf, D=128, n_token=M)``: DimReduction.fc1 (no bias), Attention_Gated(D_inner, 128, M),
    one Classifier_1fc per branch (``classifier.i.fc``) and ``Slide_classifier.fc``."""
    shapes = {
        "dimreduction.fc1.weight": (d_inner, d_feat),
        "attention.attention_V.0.weight": (128, d_inner),
        "attention.attention_V.0.bias": (128,),
        "attention.attention_U.0.weight": (128, d_inner),
        "attention.attention_U.0.bias": (128,),
        "attention.attention_weights.weight": (n_token, 128),
        "attention.attention_weights.bias": (n_token,),
    }
    for i in range(n_token):
        shapes |= {f"classifier.{i}.fc.weight": (n_class, d_inner), f"classifier.{i}.fc.bias": (n_class,)}
    return shapes | {"Slide_classifier.fc.weight": (n_class, d_inner), "Slide_classifier.fc.bias": (n_class,)}


def abmil_shapes(d_feat: int, d_inner: int, n_class: int) -> dict[str, tuple[int, ...]]:
    """``ABMIL(conf)``: as ACMIL_GA with one attention output and a single ``classifier.fc``."""
    shapes = {k: v for k, v in acmil_ga_shapes(d_feat, d_inner, n_class, 1).items() if "classifier" not in k}
    return shapes | {"classifier.fc.weight": (n_class, d_inner), "classifier.fc.bias": (n_class,)}


def _gated_logits(W: dict[str, torch.Tensor], h: torch.Tensor) -> torch.Tensor:
    """Attention_Gated: ``(N, L) -> (K, N)`` raw logits."""
    v = torch.tanh(h @ W["attention.attention_V.0.weight"].T + W["attention.attention_V.0.bias"])
    u = torch.sigmoid(h @ W["attention.attention_U.0.weight"].T + W["attention.attention_U.0.bias"])
    return ((v * u) @ W["attention.attention_weights.weight"].T + W["attention.attention_weights.bias"]).T


def acmil_reference(W: dict[str, torch.Tensor], x: torch.Tensor, n_token: int):
    """ACMIL_GA.forward in eval mode on one bag ``x (N, D)``: (branch logits (M, C), slide logits (1, C), A)."""
    W = {k: v.double() for k, v in W.items()}
    h = torch.relu(x.double() @ W["dimreduction.fc1.weight"].T)
    A = _gated_logits(W, h)  # (M, N)
    a = torch.softmax(A, dim=1)
    afeat = a @ h
    sub = torch.stack(
        [afeat[i] @ W[f"classifier.{i}.fc.weight"].T + W[f"classifier.{i}.fc.bias"] for i in range(n_token)]
    )
    bag = a.mean(0, keepdim=True) @ h
    return sub, bag @ W["Slide_classifier.fc.weight"].T + W["Slide_classifier.fc.bias"], A


@pytest.mark.parametrize(("d_feat", "d_inner", "params"), [(512, 256, 200_593), (384, 128, 84_369)])
def test_acmil_authors_checkpoint_loads_and_matches(tmp_path: Path, d_feat: int, d_inner: int, params: int) -> None:
    # ACMIL_GA(conf(D_feat, D_inner, n_class=2), n_token=5): 200,593 parameters (ResNet-18 features) and
    # 84,369 (ViT-S features), the authors' table giving D_inner = 128 for 384-d features
    assert _n_params(zoo.create_model("acmil", in_dim=d_feat)) == params
    assert zoo.create_model("acmil", in_dim=d_feat).dim == d_inner  # default inner width = the authors' table
    shapes = acmil_ga_shapes(d_feat, d_inner, n_class=3, n_token=5)
    W = _fill(shapes, seed=d_feat)
    assert sum(math.prod(s) for s in acmil_ga_shapes(d_feat, d_inner, 2, 5).values()) == params
    # as Step3_WSI_classification_ACMIL.py's save_model writes it (without its pickled `config` object)
    optimizer_state = {"state": {}, "param_groups": [{"lr": 1e-4, "weight_decay": 1e-5, "params": list(range(15))}]}
    wrapped = {"model": W, "optimizer": optimizer_state, "epoch": 12}
    heads = _both_routes("acmil", wrapped, tmp_path, in_dim=d_feat, num_classes=3)
    heads.append(_both_routes("acmil", W, tmp_path, in_dim=d_feat, num_classes=3)[0])  # bare state dict
    x = torch.randn(300, d_feat, generator=torch.Generator().manual_seed(1))
    sub, slide, A = acmil_reference(W, x, n_token=5)
    for head in heads:
        with torch.no_grad():
            out = head(x)
        torch.testing.assert_close(out["logits"][0].double(), slide[0], atol=ATOL, rtol=0)
        torch.testing.assert_close(out["aux_logits"][0].double(), sub, atol=ATOL, rtol=0)
        torch.testing.assert_close(out["attention_logits"][0].double(), A, atol=ATOL, rtol=0)


def test_acmil_training_masking_draws_as_the_authors(tmp_path: Path) -> None:
    """STKIM in training: under the same seed zoo hides the same instances as ACMIL_GA.forward."""
    W = _fill(acmil_ga_shapes(64, 32, 2, 5), seed=3, scale=0.3)
    head = _both_routes("acmil", {"model": W}, tmp_path, in_dim=64, num_classes=2)[0].train()
    x = torch.randn(40, 64, generator=torch.Generator().manual_seed(2))
    torch.manual_seed(11)
    with torch.no_grad():
        out = head(x)
    # the authors' masking, in their order of random draws (one (M, K) uniform tensor)
    A = _gated_logits(
        {k: v.double() for k, v in W.items()}, torch.relu(x.double() @ W["dimreduction.fc1.weight"].T.double())
    )
    torch.manual_seed(11)
    indices = torch.topk(A, 10, dim=-1).indices
    chosen = torch.argsort(torch.rand(*indices.shape), dim=-1)[:, : int(10 * 0.6)]
    hidden = torch.zeros_like(A, dtype=torch.bool).scatter_(-1, indices.gather(1, chosen), True)
    assert torch.equal(out["attention_logits"][0] == -1e9, hidden)


@pytest.mark.parametrize(("d_feat", "d_inner", "params"), [(512, 256, 197_507), (384, 128, 82_563)])
def test_abmil_authors_checkpoint_loads_and_matches(tmp_path: Path, d_feat: int, d_inner: int, params: int) -> None:
    # ABMIL(conf(D_feat, D_inner, n_class=2)) of the ACMIL code: 197,507 and 82,563 parameters
    assert _n_params(zoo.create_model("abmil", in_dim=d_feat)) == params
    W = _fill(abmil_shapes(d_feat, d_inner, 2), seed=5)
    x = torch.randn(200, d_feat, generator=torch.Generator().manual_seed(4))
    Wd = {k: v.double() for k, v in W.items()}
    h = torch.relu(x.double() @ Wd["dimreduction.fc1.weight"].T)
    z = torch.softmax(_gated_logits(Wd, h), dim=1) @ h
    expected = z @ Wd["classifier.fc.weight"].T + Wd["classifier.fc.bias"]
    for head in _both_routes("abmil", W, tmp_path, in_dim=d_feat):
        with torch.no_grad():
            torch.testing.assert_close(head(x)["logits"].double(), expected, atol=ATOL, rtol=0)
    # the README's ABMIL baseline (ACMIL_GA, n_token=1) loads too: its slide classifier gives the logits
    W1 = _fill(acmil_ga_shapes(d_feat, d_inner, 2, 1), seed=6)
    _, slide, _ = acmil_reference(W1, x, n_token=1)
    head = _both_routes("abmil", {"model": W1}, tmp_path, in_dim=d_feat)[0]
    with torch.no_grad():
        torch.testing.assert_close(head(x)["logits"].double(), slide, atol=ATOL, rtol=0)


def test_acmil_layouts_zoo_lacks_or_other_sizes_are_named(tmp_path: Path) -> None:
    W = _fill(acmil_ga_shapes(384, 128, 2, 5), seed=7)
    path = tmp_path / "acmil_vits.pth"
    torch.save({"model": W}, path)
    with pytest.raises(ValueError, match=r"in_dim=384, dim=128, attn_dim=128, num_branches=5, num_classes=2"):
        zoo.create_model("acmil", checkpoint_path=path)  # built for 512-d features
    with pytest.raises(ValueError, match="ACMIL_GA with 5 attention branches"):
        zoo.create_model("abmil", in_dim=384, checkpoint_path=path)
    torch.save({"model": {**W, "q": torch.zeros(1, 5, 128), "sub_attention.0.q_proj.weight": torch.zeros(1)}}, path)
    with pytest.raises(ValueError, match="ACMIL_MHA"):
        zoo.create_model("acmil", in_dim=384, checkpoint_path=path)


def test_acmil_checkpoint_with_its_pickled_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    utils, utils_utils = types.ModuleType("utils"), types.ModuleType("utils.utils")
    Struct = type("Struct", (), {"__module__": "utils.utils", "__init__": lambda self, **kw: self.__dict__.update(kw)})
    utils_utils.Struct, utils.utils = Struct, utils_utils
    monkeypatch.setitem(sys.modules, "utils", utils)
    monkeypatch.setitem(sys.modules, "utils.utils", utils_utils)
    W = _fill(acmil_ga_shapes(512, 256, 2, 5), seed=8)
    path = tmp_path / "checkpoint-best.pth"
    torch.save({"model": W, "epoch": 3, "config": Struct(D_feat=512, D_inner=256, n_class=2)}, path)
    monkeypatch.delitem(sys.modules, "utils.utils")  # a user's process does not have the authors' code
    model = zoo.create_model("acmil", checkpoint_path=path)  # weights_only: the config loads as a plain bag
    bare = tmp_path / "bare.pth"
    torch.save(W, bare)
    reference = zoo.create_model("acmil", checkpoint_path=bare)
    for name, tensor in reference.state_dict().items():
        assert torch.equal(model.state_dict()[name], tensor), name


# --------------------------------------------------------------------------------------------------
# CLAM (mahmoodlab/CLAM models/model_clam.py)


def clam_shapes(n_classes: int, multi_branch: bool, embed_dim: int = 1024) -> dict[str, tuple[int, ...]]:
    """``CLAM_SB`` / ``CLAM_MB(gate=True, size_arg='small', embed_dim=1024)``: attention_net = Sequential(Linear
    (1024, 512), ReLU, Dropout, Attn_Net_Gated(512, 256, 1 or C)); ``classifiers`` = Linear(512, C) (SB) or one
    Linear(512, 1) per class (MB); one Linear(512, 2) instance classifier per class."""
    k = n_classes if multi_branch else 1
    shapes = {
        "attention_net.0.weight": (512, embed_dim),
        "attention_net.0.bias": (512,),
        "attention_net.3.attention_a.0.weight": (256, 512),
        "attention_net.3.attention_a.0.bias": (256,),
        "attention_net.3.attention_b.0.weight": (256, 512),
        "attention_net.3.attention_b.0.bias": (256,),
        "attention_net.3.attention_c.weight": (k, 256),
        "attention_net.3.attention_c.bias": (k,),
    }
    if multi_branch:
        for c in range(n_classes):
            shapes |= {f"classifiers.{c}.weight": (1, 512), f"classifiers.{c}.bias": (1,)}
    else:
        shapes |= {"classifiers.weight": (n_classes, 512), "classifiers.bias": (n_classes,)}
    for c in range(n_classes):
        shapes |= {f"instance_classifiers.{c}.weight": (2, 512), f"instance_classifiers.{c}.bias": (2,)}
    return shapes


def clam_reference(W: dict[str, torch.Tensor], x: torch.Tensor, multi_branch: bool):
    """CLAM forward on one bag: (logits (1, C), raw attention (K, N), h (N, 512), softmaxed A (K, N))."""
    W = {k: v.double() for k, v in W.items()}
    h = torch.relu(x.double() @ W["attention_net.0.weight"].T + W["attention_net.0.bias"])
    a = torch.tanh(h @ W["attention_net.3.attention_a.0.weight"].T + W["attention_net.3.attention_a.0.bias"])
    b = torch.sigmoid(h @ W["attention_net.3.attention_b.0.weight"].T + W["attention_net.3.attention_b.0.bias"])
    A_raw = ((a * b) @ W["attention_net.3.attention_c.weight"].T + W["attention_net.3.attention_c.bias"]).T
    A = torch.softmax(A_raw, dim=1)
    M = A @ h
    if multi_branch:
        C = A.shape[0]
        logits = torch.stack([M[c] @ W[f"classifiers.{c}.weight"][0] + W[f"classifiers.{c}.bias"][0] for c in range(C)])
        return logits[None], A_raw, h, A
    return M @ W["classifiers.weight"].T + W["classifiers.bias"], A_raw, h, A


def clam_instance_loss(W, h, A, label: int, n_classes: int, subtyping: bool, k: int = 8) -> torch.Tensor:
    """CLAM's inst_eval / inst_eval_out with CrossEntropyLoss, summed and (subtyping) divided by C."""
    total = torch.zeros((), dtype=torch.float64)
    for c in range(n_classes):
        a = A[c if A.shape[0] > 1 else 0]
        w, b = W[f"instance_classifiers.{c}.weight"].double(), W[f"instance_classifiers.{c}.bias"].double()
        top = h[torch.topk(a, k).indices]
        if c == label:
            inst = torch.cat([top, h[torch.topk(-a, k).indices]])
            total = total + F.cross_entropy(inst @ w.T + b, torch.tensor([1] * k + [0] * k))
        elif subtyping:
            total = total + F.cross_entropy(top @ w.T + b, torch.zeros(k, dtype=torch.long))
    return total / n_classes if subtyping else total


@pytest.mark.parametrize(
    ("name", "multi_branch", "n_classes", "params"),
    # CLAM_SB / CLAM_MB(embed_dim=1024, n_classes=C): 790,791 (SB, C=2), 791,048 (MB, C=2), 792,844 (MB, C=3)
    [("clam_sb_mil", False, 2, 790_791), ("clam_sb_mil", False, 3, None), ("clam_mb_mil", True, 2, 791_048),
     ("clam_mb_mil", True, 3, 792_844)],
)  # fmt: skip
def test_clam_authors_checkpoint_loads_and_matches(
    tmp_path: Path, name: str, multi_branch: bool, n_classes: int, params: int | None
) -> None:
    shapes = clam_shapes(n_classes, multi_branch)
    if params is not None:
        assert _n_params(zoo.create_model(name, num_classes=n_classes)) == params
        assert sum(math.prod(s) for s in shapes.values()) == params
    W = _fill(shapes, seed=n_classes + 10 * multi_branch, scale=0.05)
    # main.py saves model.state_dict() bare; its published demo checkpoint also has CLAM's DataParallel
    # (`attention_net.module.`) and the smooth-SVM loss's buffer (`instance_loss_fn.labels`)
    as_demo = {k.replace("attention_net.", "attention_net.module."): v for k, v in W.items()}
    as_demo["instance_loss_fn.labels"] = torch.arange(n_classes)
    subtyping = n_classes > 2
    heads = _both_routes(name, W, tmp_path, num_classes=n_classes, subtyping=subtyping)
    heads += _both_routes(name, as_demo, tmp_path, num_classes=n_classes, subtyping=subtyping)
    x = torch.randn(120, 1024, generator=torch.Generator().manual_seed(n_classes))
    logits, A_raw, h, A = clam_reference(W, x, multi_branch)
    for head in heads:
        with torch.no_grad():
            out = head(x)
        torch.testing.assert_close(out["logits"].double(), logits, atol=ATOL, rtol=0)
        torch.testing.assert_close(out["attention_logits"][0].double(), A_raw, atol=ATOL, rtol=0)
        for label in range(n_classes):
            with torch.no_grad():
                got = head.loss(out, torch.tensor([label]))["instance"]
            expected = clam_instance_loss(W, h, A, label, n_classes, subtyping)
            torch.testing.assert_close(got.double(), expected, atol=ATOL, rtol=0)


def test_clam_published_demo_tag_names_its_file_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args, **kwargs):
        raise OSError("network disabled in tests")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    assert "clam_sb_mil.nsclc_demo" in zoo.list_pretrained("clam*")
    with pytest.raises(zoo.PretrainedWeightsUnavailableError, match=r"s_0_checkpoint\.pt") as info:
        zoo.create_model("clam_sb_mil", pretrained=True, cache_dir=tmp_path)
    assert "pretrained_cfg_overlay=dict(file=" in str(info.value)
    # the call it names builds a head of the demo's sizes with the defaults (1024-d features, 2 classes)
    W = _fill(clam_shapes(2, multi_branch=False), seed=21)
    head = _both_routes("clam_sb_mil", W, tmp_path)[1]
    assert head.pretrained_cfg["label_names"] == ("LUAD", "LSCC")


def test_clam_without_gating_is_named(tmp_path: Path) -> None:
    W = {"attention_net.0.weight": torch.zeros(512, 1024), "attention_net.3.module.0.weight": torch.zeros(256, 512)}
    path = tmp_path / "clam_ungated.pt"
    torch.save(W, path)
    with pytest.raises(ValueError, match="gate=False"):
        zoo.create_model("clam_sb_mil", checkpoint_path=path)


# --------------------------------------------------------------------------------------------------
# TransMIL (szc19990412/TransMIL models/TransMIL.py on lucidrains' nystrom-attention)


def transmil_shapes(n_classes: int = 2) -> dict[str, tuple[int, ...]]:
    """``TransMIL(n_classes)``: _fc1 Linear(1024, 512); cls_token (1, 1, 512); PPEG depthwise 7/5/3 convs;
    two TransLayers (LayerNorm + NystromAttention(dim 512, dim_head 64, heads 8, residual conv 33, no bias));
    LayerNorm; _fc2 Linear(512, C)."""
    shapes: dict[str, tuple[int, ...]] = {"cls_token": (1, 1, 512)}
    for name, k in (("proj", 7), ("proj1", 5), ("proj2", 3)):
        shapes |= {f"pos_layer.{name}.weight": (512, 1, k, k), f"pos_layer.{name}.bias": (512,)}
    shapes |= {"_fc1.0.weight": (512, 1024), "_fc1.0.bias": (512,)}
    for layer in ("layer1", "layer2"):
        shapes |= {
            f"{layer}.norm.weight": (512,),
            f"{layer}.norm.bias": (512,),
            f"{layer}.attn.to_qkv.weight": (1536, 512),
            f"{layer}.attn.to_out.0.weight": (512, 512),
            f"{layer}.attn.to_out.0.bias": (512,),
            f"{layer}.attn.res_conv.weight": (8, 1, 33, 1),
        }
    return shapes | {
        "norm.weight": (512,),
        "norm.bias": (512,),
        "_fc2.weight": (n_classes, 512),
        "_fc2.bias": (n_classes,),
    }


def nystrom_reference(W: dict[str, torch.Tensor], p: str, x: torch.Tensor, legacy: bool = False) -> torch.Tensor:
    """lucidrains' NystromAttention.forward (heads 8, 256 landmarks, 6 pinv iterations), no mask."""
    b, n, d = x.shape
    heads, m = 8, 256
    x = F.pad(x, (0, 0, (m - n % m) % m, 0))  # front padding with zero tokens
    q, k, v = (t.reshape(b, -1, heads, d // heads).transpose(1, 2) for t in (x @ W[p + "to_qkv.weight"].T).chunk(3, -1))
    q = q * (d // heads) ** -0.5
    seg = math.ceil(n / m)
    q_l = q.reshape(b, heads, m, seg, -1).sum(3) / seg
    k_l = k.reshape(b, heads, m, seg, -1).sum(3) / seg
    attn1, attn2, attn3 = (torch.softmax(s, -1) for s in (q @ k_l.mT, q_l @ k_l.mT, q_l @ k.mT))
    z = attn2.mT / (attn2.abs().sum(-1).max() * attn2.abs().sum(-2).max())
    eye = torch.eye(m, dtype=x.dtype)
    for _ in range(6):
        xz = attn2 @ z
        z = 0.25 * z @ (13 * eye - xz @ (15 * eye - xz @ (7 * eye - xz)))
    out = attn1 @ z @ (attn3 @ v) + F.conv2d(v, W[p + "res_conv.weight"], padding=(16, 0), groups=heads)
    out = out.transpose(1, 2).reshape(b, -1, d) @ W[p + "to_out.0.weight"].T + W[p + "to_out.0.bias"]
    return out[:, :n] if legacy else out[:, -n:]  # nystrom-attention <= 0.0.9 kept the first n


def transmil_reference(W: dict[str, torch.Tensor], x: torch.Tensor, legacy: bool = False) -> torch.Tensor:
    """TransMIL.forward on ``x (1, n, 1024)`` -> logits (1, C), in float64."""
    W = {k: v.double() for k, v in W.items()}
    h = torch.relu(x.double() @ W["_fc1.0.weight"].T + W["_fc1.0.bias"])
    n = h.shape[1]
    side = math.ceil(math.sqrt(n))
    h = torch.cat([W["cls_token"], h, h[:, : side * side - n]], dim=1)

    def layer(h: torch.Tensor, p: str) -> torch.Tensor:
        normed = F.layer_norm(h, (512,), W[p + "norm.weight"], W[p + "norm.bias"])
        return h + nystrom_reference(W, p + "attn.", normed, legacy)

    h = layer(h, "layer1.")
    grid = h[:, 1:].transpose(1, 2).reshape(1, 512, side, side)
    convs = [F.conv2d(grid, W[f"pos_layer.{c}.weight"], W[f"pos_layer.{c}.bias"], padding=k // 2, groups=512)
             for c, k in (("proj", 7), ("proj1", 5), ("proj2", 3))]  # fmt: skip
    h = torch.cat([h[:, :1], (grid + sum(convs)).flatten(2).transpose(1, 2)], dim=1)
    h = F.layer_norm(layer(h, "layer2."), (512,), W["norm.weight"], W["norm.bias"])[:, 0]
    return h @ W["_fc2.weight"].T + W["_fc2.bias"]


def _transmil_weights() -> dict[str, torch.Tensor]:
    W = _fill(transmil_shapes(), seed=31)
    W["cls_token"] = W["cls_token"] / 0.05  # the authors' N(0, 1) class token
    for key in ("layer1.norm.weight", "layer2.norm.weight", "norm.weight"):
        W[key] = W[key] + 1.0
    return W


def test_transmil_parameters_and_init() -> None:
    # TransMIL(n_classes=2): 2,672,146 parameters (no bias on the residual convolutions)
    head = zoo.create_model("transmil")
    assert _n_params(head) == 2_672_146 == sum(math.prod(s) for s in transmil_shapes().values())
    assert head.layer1.attn.residual.bias is None
    assert 0.5 < float(head.cls_token.detach().std()) < 1.5  # torch.randn(1, 1, 512), not a 0.02-scaled token


@pytest.mark.parametrize("legacy", [False, True], ids=["nystrom-attention>=0.0.10", "legacy_nystrom"])
def test_transmil_authors_checkpoint_loads_and_matches(tmp_path: Path, legacy: bool) -> None:
    W = _transmil_weights()
    # PyTorch Lightning's ModelCheckpoint(save_weights_only=True) of TransMIL's ModelInterface (`self.model`)
    lightning = {"epoch": 4, "global_step": 400, "pytorch-lightning_version": "1.2.3",
                 "state_dict": {f"model.{k}": v for k, v in W.items()}}  # fmt: skip
    heads = _both_routes("transmil", lightning, tmp_path, legacy_nystrom=legacy)
    heads.append(_both_routes("transmil", W, tmp_path, legacy_nystrom=legacy)[0])  # bare
    gen = torch.Generator().manual_seed(5)
    for n in (100, 300):  # 100: fewer tokens than landmarks (zero-token padding); 300: 2 tokens a landmark
        x = torch.randn(1, n, 1024, generator=gen)
        expected = transmil_reference(W, x, legacy)
        for head in heads:
            with torch.no_grad():
                torch.testing.assert_close(head(x)["logits"].double(), expected, atol=ATOL, rtol=0)


def test_transmil_exact_short_bags_is_an_opt_in_deviation(tmp_path: Path) -> None:
    W = _transmil_weights()
    head = _both_routes("transmil", W, tmp_path, exact_short_bags=True)[0]
    x = torch.randn(1, 100, 1024, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        assert (head(x)["logits"].double() - transmil_reference(W, x)).abs().max() > 1e-3
    assert set(mil.FAMILY["deviations"]["transmil"]) == {"exact_short_bags", "legacy_nystrom"}


# --------------------------------------------------------------------------------------------------
# zoo's own layout passes unchanged


@pytest.mark.parametrize("name", ["mean_mil", "max_mil", "abmil", "acmil", "clam_sb_mil", "clam_mb_mil", "transmil"])
def test_zoo_layout_is_unchanged(tmp_path: Path, name: str) -> None:
    head = zoo.create_model(name, in_dim=24, num_classes=3)
    state = head.state_dict()
    assert mil.checkpoint_filter_fn(state, head) is state
    optimizer = torch.optim.AdamW(head.parameters())
    path = tmp_path / "best.pt"  # what `zoo mil train` writes (zoo.train.mil: ckpt.save(state, ...))
    torch.save(
        dict(model=state, optimizer=optimizer.state_dict(), epoch=2, config={"model": name}, classes=["a", "b", "c"],
             in_dim=24, step=2, metric=1.5),
        path,
    )  # fmt: skip
    loaded = zoo.create_model(name, in_dim=24, num_classes=3, checkpoint_path=path)
    for key, value in loaded.state_dict().items():
        assert torch.equal(value, state[key]), key


def test_direct_pretrained_call_names_the_file_route() -> None:
    with pytest.raises(RuntimeError, match=r"zoo.create_model\('clam_mb_mil', checkpoint_path="):
        mil.clam_mb_mil(pretrained=True)


def test_overlay_and_direct_calls_load_the_authors_file(tmp_path: Path) -> None:
    W = _fill(abmil_shapes(64, 32, 2), seed=41)
    path = tmp_path / "abmil_authors.pth"
    torch.save(W, path)
    x = torch.randn(30, 64, generator=torch.Generator().manual_seed(9))
    expected = zoo.create_model("abmil", in_dim=64, checkpoint_path=path).eval()(x)["logits"]
    for head in (
        zoo.create_model("abmil", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), in_dim=64),
        mil.abmil(pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), in_dim=64),
    ):
        with torch.no_grad():
            torch.testing.assert_close(head.eval()(x)["logits"], expected, atol=0, rtol=0)
