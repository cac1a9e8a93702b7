"""zoo's registry and factory: timm's semantics, zoo names first, timm untouched."""

from __future__ import annotations

import sys
import types

import pytest
import timm
import torch
from timm.models import generate_default_cfgs
from timm.models._registry import _model_entrypoints

import zoo
from zoo import _registry


def test_every_timm_davit_is_listed_and_builds() -> None:
    assert zoo.list_models("davit*") == timm.list_models("davit*")
    assert zoo.list_pretrained("davit*") == timm.list_pretrained("davit*")
    assert zoo.list_models("davit*", pretrained=True) == timm.list_models("davit*", pretrained=True)
    assert "davit_tiny.msft_in1k" in zoo.list_models("davit_tiny", include_tags=True)
    assert zoo.list_models(["davit_t*", "davit_s*"]) == ["davit_small", "davit_tiny"]
    assert "davit_base" not in zoo.list_models("davit*", exclude_filters=["*base*"])
    assert zoo.list_models(module="davit") == zoo.list_models("davit*")


def test_kind_filter() -> None:
    assert "davit_tiny" in zoo.list_models(kind="backbone")
    assert "davit_tiny" not in zoo.list_models(kind=["mil_head", "probe", "scanpath"])
    assert zoo.model_kind("davit_tiny") == "backbone"
    with pytest.raises(ValueError, match="unknown kind"):
        zoo.list_models(kind="detector")


def test_readme_example_davit_one_channel_ten_classes() -> None:
    model = zoo.create_model("davit_tiny", num_classes=10, in_chans=1)
    assert model(torch.randn(2, 1, 96, 128)).shape == (2, 10)


def test_is_model_resolves_zoo_then_timm() -> None:
    assert zoo.is_model("davit_tiny") and zoo.is_model("davit_tiny.msft_in1k")
    assert zoo.is_model("resnet18") and not zoo.is_zoo_model("resnet18")
    assert not zoo.is_model("no_such_model")


def test_timm_names_fall_back_to_timm() -> None:
    model = zoo.create_model("resnet10t", num_classes=3)
    assert isinstance(model, timm.models.ResNet) and model.num_classes == 3


def test_unknown_model_suggests_close_names() -> None:
    with pytest.raises(RuntimeError, match="davit_tiny"):
        zoo.create_model("davit_tinyy")


def test_close_model_names_once_each_zoo_and_timm() -> None:
    """Zoo-only names are in timm's registry too: each is suggested once; case and tag do not matter."""
    names = _registry.close_model_names("BiFormer_Tiyn.in1k", n=5)
    assert names[0] == "biformer_tiny" and len(names) == len(set(names))
    assert "resnet18" in _registry.close_model_names("resnet81")  # timm's names are candidates too
    assert _registry.close_model_names("zzzzzz") == []


def test_zoo_only_names_in_timm_build_the_zoo_class() -> None:
    model = timm.create_model("biformer_tiny", depths=(1, 1, 1, 1), num_classes=3, device="meta")
    assert type(model).__module__ == "zoo.models.biformer" and model.num_classes == 3
    assert timm.models.model_entrypoint("biformer_tiny").__wrapped__ is zoo.models.biformer.biformer_tiny


def test_tags_and_invalid_tag() -> None:
    cfg = zoo.get_pretrained_cfg("davit_tiny")
    assert cfg.tag == "msft_in1k" and cfg.hf_hub_id == "timm/davit_tiny.msft_in1k"
    model = zoo.create_model("davit_tiny.msft_in1k")
    assert model.pretrained_cfg["tag"] == "msft_in1k"
    with pytest.raises(RuntimeError, match="msft_in1k"):
        zoo.get_pretrained_cfg("davit_tiny.nope")
    with pytest.raises(RuntimeError, match="invalid pretrained tag"):
        zoo.create_model("davit_tiny.nope")


def test_standard_kwargs_reach_the_model() -> None:
    model = zoo.create_model(
        "davit_tiny", num_classes=5, drop_rate=0.25, drop_path_rate=0.2, global_pool="max", drop_path=None
    )
    assert model.num_classes == 5 and model.head.fc.out_features == 5
    assert model.head.drop.p == 0.25
    rates = [m.drop_prob for m in model.modules() if isinstance(m, timm.layers.DropPath)]
    assert rates and max(rates) == pytest.approx(0.2)
    assert model.head.global_pool.pool_type == "max"


def test_features_only_kwargs() -> None:
    model = zoo.create_model("davit_tiny", features_only=True, out_indices=(2, 3), feature_cls="getter")
    assert model.feature_info.reduction() == [16, 32]
    outs = model(torch.randn(1, 3, 64, 64))
    assert [o.shape[1] for o in outs] == [384, 768]


def test_pretrained_cfg_overlay_and_dict() -> None:
    model = zoo.create_model("davit_tiny", pretrained_cfg_overlay=dict(crop_pct=0.5))
    assert model.pretrained_cfg["crop_pct"] == 0.5
    model = zoo.create_model("davit_tiny", pretrained_cfg=dict(input_size=(3, 160, 160), num_classes=4))
    assert timm.data.resolve_data_config(model=model)["input_size"] == (3, 160, 160)


def _toy_module(name: str) -> types.ModuleType:
    """A family module defining one architecture ``name`` (a tiny ResNet), registered with zoo's decorator."""
    module = types.ModuleType(f"zoo_test_family_{name}")
    sys.modules[module.__name__] = module
    module.default_cfgs = generate_default_cfgs({f"{name}.toy_in1k": dict(file="", num_classes=7)})

    def entry(pretrained: bool = False, **kwargs):
        for key in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):
            kwargs.pop(key, None)
        kwargs.setdefault("num_classes", 7)
        model = timm.models.ResNet(timm.models.resnet.BasicBlock, [1, 1, 1, 1], **kwargs)
        model.made_by = "zoo toy"
        return model

    entry.__name__ = name
    entry.__module__ = module.__name__
    module.entry = entry
    return module


@pytest.fixture
def restore_registries():
    entries = dict(_registry._entries)
    timm_entries = dict(_model_entrypoints)
    yield
    for name in set(_registry._entries) - set(entries):
        _registry._remove_entry(name)
    for name in set(_model_entrypoints) - set(timm_entries):
        timm.models._registry._clear_model_entries(name)
        _model_entrypoints.pop(name)


def test_zoo_only_names_are_registered_into_timm(restore_registries) -> None:
    module = _toy_module("zoo_toy_net")
    zoo.register_model(module.entry)
    assert "zoo_toy_net" in zoo.list_models(kind="backbone")
    assert timm.is_model("zoo_toy_net")
    assert timm.create_model("zoo_toy_net").made_by == "zoo toy"
    assert zoo.create_model("zoo_toy_net").num_classes == 7
    assert zoo.get_pretrained_cfg("zoo_toy_net").tag == "toy_in1k"


def test_only_image_backbones_are_registered_into_timm() -> None:
    heads = zoo.list_models(kind=["mil_head", "probe", "scanpath"])
    assert {"abmil", "acmil", "efficient_probe", "oat"} <= set(heads)
    assert not [name for name in heads if timm.is_model(name)]  # timm's tools would take them for backbones
    assert not timm.list_models("*mil*") and not timm.list_models("*probe*")
    assert timm.is_model("biformer_tiny") and timm.is_model("halonet_h0")
    assert zoo.create_model("abmil", in_dim=8).in_dim == 8  # reached through zoo


def test_zoo_never_replaces_a_timm_entry(restore_registries) -> None:
    timm_resnet18 = timm.models.model_entrypoint("resnet18")
    module = _toy_module("resnet18")
    zoo.register_model(module.entry)
    assert timm.models.model_entrypoint("resnet18") is timm_resnet18
    assert timm.get_pretrained_cfg("resnet18").tag != "toy_in1k"
    assert not hasattr(timm.create_model("resnet18"), "made_by")
    # zoo resolves its own first, with its own cfgs
    assert zoo.create_model("resnet18").made_by == "zoo toy"
    assert zoo.get_pretrained_cfg("resnet18").tag == "toy_in1k"


def test_register_model_rejects_unknown_kind() -> None:
    with pytest.raises(ValueError, match="unknown registry kind"):
        zoo.register_model(kind="detector")
