"""Model layer of "trustworthy runs": bad model arguments, backend names, offline weights, suggestions, files.

Each test states one promise of ``zoo.create_model`` (and of ``timm.create_model`` for zoo-only names):

1. sizes, counts and rates no model can mean are a ``ValueError`` naming the keyword and the value;
2. an unknown ``ZOO_OPS_BACKEND`` name or op is an error listing the known names;
3. offline, ``pretrained=True`` is ``PretrainedWeightsUnavailableError`` naming the file route, never a
   network or Hub exception;
4. "did you mean" lists name each model once;
5. no weight file runs code, and an error names the file without advising ``weights_only=False``.

Nothing here touches the network (``no_network``) and every build is small or on the meta device.
"""

from __future__ import annotations

import os
import pathlib
import re
import socket

import pytest
import timm
import torch

import zoo
import zoo.ops as ops
from zoo._io import CorruptFileError, UnsafeFileError
from zoo.ops import BackendUnavailableError, _dispatch

# --------------------------------------------------------------------------------------------- helpers


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every connection attempt fails at once, as on a machine without network (and nothing leaves this one)."""

    def refuse(*args, **kwargs):
        raise OSError("network disabled in this test")

    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


@pytest.fixture(params=["HF_HUB_OFFLINE=1", "HF_HUB_OFFLINE unset"])
def hub_mode(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch, no_network: None) -> str:
    """Both ways a user is offline: with the Hub's offline flag, and without it (the network just fails)."""
    from huggingface_hub import constants

    offline = request.param.endswith("=1")
    if offline:
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    else:
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", offline)  # read once at import by huggingface_hub
    return request.param


class _Payload:
    """Unpickling this object runs ``Path.touch(marker)``: proof that a file ran code."""

    def __init__(self, marker: pathlib.Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


def _assert_refused(err: BaseException, path: pathlib.Path, marker: pathlib.Path) -> None:
    message = str(err)
    assert not marker.exists(), "the file ran code"
    assert str(path) in message, message
    assert "weights_only=False" not in message, message


# ----------------------------------------------------------------------- 1. sizes, counts and rates

BAD_KWARGS = [
    # backbones
    ("biformer_tiny", dict(num_classes=-1), "num_classes", "-1"),
    ("biformer_tiny", dict(in_chans=-3), "in_chans", "-3"),
    ("biformer_tiny", dict(in_chans=0), "in_chans", "0"),
    ("biformer_tiny", dict(drop_path_rate=-0.1), "drop_path_rate", "-0.1"),
    ("biformer_tiny", dict(drop_path_rate=1.5), "drop_path_rate", "1.5"),
    ("biformer_tiny", dict(drop_rate=float("nan")), "drop_rate", "nan"),
    ("biformer_tiny", dict(depths=[-1, 1, 1, 1]), "depths", "-1"),
    ("biformer_tiny", dict(embed_dims=(-64, 128, 256, 512)), "embed_dims", "-64"),
    ("biformer_tiny", dict(n_win=-2), "n_win", "-2"),
    ("biformer_tiny", dict(head_dim=0), "head_dim", "0"),
    ("biformer_tiny", dict(mlp_ratios=-3.0), "mlp_ratios", "-3.0"),
    ("davit_tiny", dict(embed_dims=(-64, 192, 384, 768)), "embed_dims", "-64"),
    ("davit_tiny", dict(num_heads=(3, 0, 12, 24)), "num_heads", "0"),
    ("davit_tiny", dict(depths=(1, -1, 3, 1)), "depths", "-1"),
    ("halonet_h0", dict(img_size=-224), "img_size", "-224"),
    ("halonet26t", dict(num_classes=-5), "num_classes", "-5"),
    ("medusa_resnet18", dict(attn_size=-256), "attn_size", "-256"),
    ("medusa_resnet18", dict(body_widths=(16, 32, -64, 128, 256)), "body_widths", "-64"),
    ("medusa_resnet18", dict(body_attn_heads=-4), "body_attn_heads", "-4"),
    # MIL heads
    ("abmil", dict(in_dim=-5), "in_dim", "-5"),
    ("abmil", dict(num_classes=-2), "num_classes", "-2"),
    ("acmil", dict(num_branches=-1), "num_branches", "-1"),
    ("acmil", dict(mask_k=-1), "mask_k", "-1"),
    ("clam_sb_mil", dict(k_sample=-8), "k_sample", "-8"),
    ("clam_sb_mil", dict(bag_weight=1.7), "bag_weight", "1.7"),
    ("clam_sb_mil", dict(dropout=-0.25), "dropout", "-0.25"),
    ("transmil", dict(num_landmarks=-4), "num_landmarks", "-4"),
    ("mean_mil", dict(dim=-8), "dim", "-8"),
    # probes
    ("efficient_probe", dict(embed_dim=-64), "embed_dim", "-64"),
    ("efficient_probe", dict(num_queries=-4), "num_queries", "-4"),
    ("efficient_probe", dict(d_out=0), "d_out", "0"),
    ("attentive_probe", dict(num_heads=0), "num_heads", "0"),
    ("aim_probe", dict(num_queries=0), "num_queries", "0"),
    ("linear_probe_avg", dict(num_prefix_tokens=-1), "num_prefix_tokens", "-1"),
    # scanpath
    ("oat", dict(grid=(-6, 14)), "grid", "-6"),
    ("oat", dict(max_objects=0), "max_objects", "0"),
    ("oat", dict(num_heads=0), "num_heads", "0"),
    ("oat", dict(dropout=1.5), "dropout", "1.5"),
    ("oat", dict(max_len=-1), "max_len", "-1"),
    ("oat", dict(pos_sigma=0.0), "pos_sigma", "0.0"),  # used to give a NaN position table silently
    # a timm architecture through zoo
    ("resnet10t", dict(in_chans=0), "in_chans", "0"),
]


@pytest.mark.parametrize("name, kwargs, key, value", BAD_KWARGS, ids=[f"{n}-{k}={v}" for n, _, k, v in BAD_KWARGS])
def test_bad_size_count_or_rate_is_a_value_error_naming_it(name, kwargs, key, value) -> None:
    with pytest.raises(ValueError) as info:
        zoo.create_model(name, **kwargs)
    message = str(info.value)
    assert f"{key}=" in message and value in message, message


def test_zoo_only_names_are_checked_through_timm_too() -> None:
    with pytest.raises(ValueError, match=r"num_classes=-1"):
        timm.create_model("biformer_tiny", num_classes=-1)


@pytest.mark.parametrize(
    "build",
    [
        lambda: zoo.models.biformer.BiFormer(depths=(1, 1, 1, 1), topks=(-1, 4, 16, -2), device="meta"),
        lambda: zoo.models.biformer.BiFormer(depths=(1, 1, 1, 1), embed_dims=(16, 32, 64, 128), device="meta"),
        lambda: zoo.heads.probing.attentive_probe(embed_dim=64, num_heads=0),
        lambda: zoo.heads.scanpath.OAT(max_objects=0),
    ],
    ids=["biformer-topk=-1", "biformer-no-head", "probe-num_heads=0", "oat-max_objects=0"],
)
def test_constructors_refuse_what_the_generic_rule_cannot_know(build) -> None:
    """Direct builds (no factory): BiFormer's topk -1 and a width below head_dim; 0 heads / objects that used to
    fall back to the default silently."""
    with pytest.raises(ValueError, match=r"topks|head_dim|num_heads|max_objects"):
        build()


def test_valid_edge_values_still_build() -> None:
    model = zoo.create_model("biformer_tiny", num_classes=0, global_pool="", drop_path_rate=1.0, device="meta")
    assert model.num_classes == 0
    features = zoo.create_model("davit_tiny", features_only=True, out_indices=(-1,), device="meta")
    assert features.feature_info.channels() == [768]
    assert zoo.create_model("abmil", in_dim=8, num_classes=3, dropout=0.0).in_dim == 8
    assert zoo.create_model("efficient_probe", embed_dim=64, num_queries=4).num_classes == 1000


@pytest.mark.parametrize("name", ["biformer_tiny", "halonet26t", "resnet18"])
@pytest.mark.parametrize(
    "out_indices, match",
    [((7,), "has (4|5) .*0 to"), ((-9,), "does not have"), (9, "does not have"), (("a",), "tuple of ints")],
)
def test_out_indices_outside_the_levels_name_them(name, out_indices, match) -> None:
    # timm raises a bare "list index out of range" here
    with pytest.raises(ValueError, match=match):
        zoo.create_model(name, features_only=True, out_indices=out_indices, device="meta")
    assert len(zoo.create_model(name, features_only=True, out_indices=2, device="meta").feature_info.channels()) == 2


# ------------------------------------------------------------------------------------ 2. ZOO_OPS_BACKEND


def _routed_inputs() -> tuple[torch.Tensor, ...]:
    q = k = v = torch.randn(1, 2, 4, 4, 8)
    routing = torch.tensor([[[0, 1], [1, 2], [2, 3], [3, 0]]])  # 4 regions of 2x2, top-2
    return q, k, v, routing


@pytest.mark.parametrize(
    "value, named",
    [("tritn", "tritn"), ("routed_attention=torch,halo_attn=torch", "halo_attn"), ("halo_attention=nope", "nope")],
)
def test_unknown_env_backend_or_op_lists_the_known_names(monkeypatch, value, named) -> None:
    monkeypatch.setenv("ZOO_OPS_BACKEND", value)
    with pytest.raises(BackendUnavailableError) as info:
        ops.select_routed_backend(*_routed_inputs(), 2, 0.3)
    message = str(info.value)
    assert named in message
    assert "torch" in message and ("triton" in message or "routed_attention" in message), message


def test_plain_env_name_applies_to_the_ops_that_have_it(monkeypatch) -> None:
    monkeypatch.setenv("ZOO_OPS_BACKEND", "torch_lean")  # a routed backend only: halo keeps auto
    assert ops.select_routed_backend(*_routed_inputs(), 2, 0.3) == "torch_lean"
    assert _dispatch._env_choice("halo_attention") is None


# ------------------------------------------------------------------------------------ 3. offline weights


def _assert_file_route(err: BaseException) -> None:
    assert isinstance(err, zoo.PretrainedWeightsUnavailableError), f"{type(err).__name__}: {err}"
    assert "pretrained_cfg_overlay=dict(file=" in str(err), str(err)


@pytest.mark.parametrize("tag", zoo.list_pretrained())
def test_every_pretrained_tag_offline_names_the_file_route(tag, hub_mode, tmp_path) -> None:
    with pytest.raises(Exception) as info:
        zoo.create_model(tag, pretrained=True, cache_dir=tmp_path / "cache", device="meta")
    _assert_file_route(info.value)


# names zoo registered into timm (BiFormer); timm's own (DaViT, timm's HaloNets) take timm's route
ZOO_ONLY_TAGS = [
    t
    for t in zoo.list_pretrained()
    if zoo._registry.get_entry(t).in_timm and zoo._registry.get_entry(t).fn.__module__.startswith("zoo.")
]


@pytest.mark.parametrize("tag", ZOO_ONLY_TAGS)
def test_zoo_only_tags_offline_through_timm_create_model(tag, hub_mode, tmp_path) -> None:
    with pytest.raises(Exception) as info:
        timm.create_model(tag, pretrained=True, cache_dir=tmp_path / "cache", device="meta")
    _assert_file_route(info.value)
    assert not any((tmp_path / "cache").glob("content*")), "a share link was cached under its bare name"


@pytest.mark.parametrize(
    "build",
    [
        lambda cache: zoo.create_model("resnet10t", pretrained=True, cache_dir=cache, device="meta"),
        lambda cache: zoo.create_model("medusa_resnet18", backbone_pretrained=True, device="meta"),
        lambda cache: zoo.create_model("hf-hub:timm/davit_tiny.msft_in1k", pretrained=True, cache_dir=cache),
    ],
    ids=["timm-arch", "medusa-backbone", "hf-hub-name"],
)
def test_other_pretrained_routes_offline(build, hub_mode, tmp_path) -> None:
    with pytest.raises(Exception) as info:
        build(tmp_path / "cache")
    _assert_file_route(info.value)


# ------------------------------------------------------------------------------------- 4. did you mean


@pytest.mark.parametrize("typo, wanted", [("biformer_tiyn", "biformer_tiny"), ("davit_tinyy", "davit_tiny")])
def test_did_you_mean_lists_each_name_once(typo, wanted) -> None:
    with pytest.raises(RuntimeError) as info:
        zoo.create_model(typo)
    suggested = re.search(r"Did you mean: (.*)\?", str(info.value)).group(1).split(", ")
    assert wanted in suggested
    assert len(suggested) == len(set(suggested)), suggested
    names = zoo._registry.close_model_names(typo)
    assert names[0] == wanted and len(names) == len(set(names)) <= 5


# ------------------------------------------------------------------------------- 5. files never run code


@pytest.fixture
def payload(tmp_path) -> tuple[pathlib.Path, pathlib.Path]:
    """A checkpoint whose state dict holds a pickle payload, and the marker the payload would create."""
    marker = tmp_path / "payload-ran"
    path = tmp_path / "weights.pth"
    torch.save({"state_dict": {"stem.conv.weight": torch.zeros(1), "evil": _Payload(marker)}}, path)
    return path, marker


@pytest.mark.parametrize("name", ["davit_tiny", "resnet10t", "abmil"])
def test_checkpoint_path_with_a_payload_is_refused(name, payload) -> None:
    path, marker = payload
    kwargs = {} if name == "abmil" else dict(device="meta")
    with pytest.raises(UnsafeFileError) as info:
        zoo.create_model(name, checkpoint_path=path, **kwargs)
    _assert_refused(info.value, path, marker)


@pytest.mark.parametrize(
    "create, name",
    [
        (zoo.create_model, "davit_tiny"),
        (zoo.create_model, "halonet26t"),
        (zoo.create_model, "resnet10t"),
        (zoo.create_model, "biformer_tiny"),
        (timm.create_model, "biformer_tiny"),
    ],
    ids=["zoo-davit", "zoo-halonet", "zoo-timm-arch", "zoo-biformer", "timm-biformer"],
)
def test_pretrained_file_with_a_payload_is_refused(create, name, payload) -> None:
    path, marker = payload
    with pytest.raises(UnsafeFileError) as info:
        create(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), device="meta")
    _assert_refused(info.value, path, marker)


def test_official_biformer_file_with_a_payload_is_refused(tmp_path) -> None:
    """The official layout ({'model': ...}, through _check_checkpoint_file and checkpoint_filter_fn)."""
    marker = tmp_path / "payload-ran"
    path = tmp_path / "biformer_tiny_in1k.pth"
    torch.save({"model": {"downsample_layers.0.0.weight": torch.zeros(32, 3, 3, 3)}, "args": _Payload(marker)}, path)
    with pytest.raises(UnsafeFileError) as info:
        zoo.create_model("biformer_tiny", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), device="meta")
    _assert_refused(info.value, path, marker)


def test_damaged_pretrained_file_is_named(tmp_path) -> None:
    path = tmp_path / "model.pth"
    path.write_bytes(b"these are not weights")
    with pytest.raises(CorruptFileError) as info:
        zoo.create_model("davit_tiny", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), device="meta")
    _assert_refused(info.value, path, tmp_path / "nothing")


def test_checkpoint_of_another_model_names_file_model_and_keys(tmp_path) -> None:
    path = tmp_path / "abmil_3_classes.pth"
    torch.save({"state_dict": zoo.create_model("abmil", in_dim=16, num_classes=3).state_dict()}, path)
    with pytest.raises(ValueError) as info:
        zoo.create_model("abmil", in_dim=16, num_classes=2, checkpoint_path=path)
    message = str(info.value)
    assert str(path) in message and "abmil" in message and "classifier.weight (3, " in message, message
    assert "num_classes" in message
    with pytest.raises(ValueError, match=r"does not fit mean_mil: \d+ unexpected keys \(attention\."):
        zoo.create_model("mean_mil", in_dim=16, num_classes=3, checkpoint_path=path)
    assert os.path.isfile(path)
