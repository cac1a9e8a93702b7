"""Weights: offline errors, official-format checkpoints through the family filter, export to timm's layout."""

from __future__ import annotations

import re

import pytest
import safetensors.torch
import timm
import torch

import zoo
from zoo.tools.export import export_model


def _official_davit_state_dict(timm_state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """timm DaViT keys -> the keys of the official dingmyu/davit checkpoints (inverse of timm's filter)."""
    out = {}
    for key, value in timm_state_dict.items():
        key = key.replace("stem.", "patch_embeds.0.").replace("patch_embeds.0.conv", "patch_embeds.0.proj")
        key = re.sub(r"stages\.(\d+)\.downsample\.conv", r"patch_embeds.\1.proj", key)
        key = re.sub(r"stages\.(\d+)\.downsample\.", r"patch_embeds.\1.", key)
        key = re.sub(r"stages\.(\d+)\.blocks\.", r"main_blocks.\1.", key)
        key = key.replace("cpe1", "cpe.0").replace("cpe2", "cpe.1")
        key = key.replace("head.fc.", "head.").replace("head.norm.", "norms.")
        out[key] = value.clone()
    return out


@pytest.fixture(scope="module")
def davit_reference() -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(3)
    model = timm.create_model("davit_tiny").eval()
    x = torch.randn(2, 3, 64, 80)
    with torch.no_grad():
        return model, x, model(x)


def test_offline_pretrained_is_one_clear_error() -> None:
    with pytest.raises(zoo.PretrainedWeightsUnavailableError) as info:
        zoo.create_model("davit_tiny", pretrained=True)
    message = str(info.value)
    assert "davit_tiny.msft_in1k" in message  # the tag
    assert "model.safetensors" in message  # the expected file
    assert "pretrained_cfg_overlay=dict(file=" in message  # how to pass a local file


def test_unreachable_network_without_offline_flag(monkeypatch) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens on the discard port
    with pytest.raises(zoo.PretrainedWeightsUnavailableError, match="davit_small.msft_in1k"):
        zoo.create_model("davit_small", pretrained=True)


def test_missing_local_file_is_named(tmp_path) -> None:
    missing = tmp_path / "nope.pth"
    with pytest.raises(zoo.PretrainedWeightsUnavailableError, match="nope.pth"):
        zoo.create_model("davit_tiny", pretrained=True, pretrained_cfg_overlay=dict(file=str(missing)))


def test_official_format_davit_checkpoint_matches_timm(davit_reference, tmp_path) -> None:
    reference, x, expected = davit_reference
    official = _official_davit_state_dict(reference.state_dict())
    assert "patch_embeds.0.proj.weight" in official and "norms.weight" in official
    path = tmp_path / "davit_tiny_official.pth"
    torch.save({"state_dict": official}, path)
    model = zoo.create_model("davit_tiny", pretrained=True, pretrained_cfg_overlay=dict(file=str(path))).eval()
    with torch.no_grad():
        assert torch.equal(model(x), expected)


def test_official_checkpoint_with_new_head_and_one_channel(davit_reference, tmp_path) -> None:
    reference, x, _ = davit_reference
    path = tmp_path / "davit_tiny_official.pth"
    torch.save({"state_dict": _official_davit_state_dict(reference.state_dict())}, path)
    model = zoo.create_model(
        "davit_tiny", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), num_classes=5, in_chans=1
    ).eval()
    # timm's adaptation: the stem sums RGB filters for one channel; the classifier is re-initialised
    torch.testing.assert_close(model.stem.conv.weight, reference.stem.conv.weight.sum(1, keepdim=True))
    assert model.head.fc.out_features == 5
    torch.testing.assert_close(model.stages[2].blocks[0][0].attn.qkv.weight, reference.state_dict()[
        "stages.2.blocks.0.0.attn.qkv.weight"])  # fmt: skip


def test_timm_format_safetensors_file_loads_unchanged(davit_reference, tmp_path) -> None:
    reference, x, expected = davit_reference
    path = tmp_path / "model.safetensors"
    safetensors.torch.save_file(reference.state_dict(), str(path))
    model = zoo.create_model("davit_tiny", pretrained=True, pretrained_cfg_overlay=dict(file=str(path))).eval()
    with torch.no_grad():
        assert torch.equal(model(x), expected)


def test_checkpoint_path_loads_timm_format(davit_reference, tmp_path) -> None:
    reference, x, expected = davit_reference
    path = tmp_path / "ckpt.pth"
    torch.save({"state_dict": reference.state_dict(), "epoch": 3}, path)
    model = zoo.create_model("davit_tiny", checkpoint_path=str(path)).eval()
    with torch.no_grad():
        assert torch.equal(model(x), expected)


def test_checkpoint_path_prefers_ema_and_strips_wrapper_prefixes(davit_reference, tmp_path) -> None:
    """As timm's load_checkpoint: 'state_dict_ema' first, DDP 'module.' prefixes removed; argparse args allowed."""
    import argparse

    reference, x, expected = davit_reference
    ema = {f"module.{k}": v for k, v in reference.state_dict().items()}
    other = {k: torch.zeros_like(v) for k, v in reference.state_dict().items()}
    path = tmp_path / "train_ckpt.pth.tar"
    torch.save({"state_dict": other, "state_dict_ema": ema, "args": argparse.Namespace(lr=0.1), "epoch": 9}, path)
    model = zoo.create_model("davit_tiny", checkpoint_path=path).eval()
    with torch.no_grad():
        assert torch.equal(model(x), expected)


def test_checkpoint_path_of_another_head_names_the_keys(davit_reference, tmp_path) -> None:
    reference, _, _ = davit_reference
    path = tmp_path / "davit_1000.pth"
    torch.save(reference.state_dict(), path)
    with pytest.raises(ValueError, match=r"davit_1000\.pth does not fit davit_tiny: 2 keys of another shape") as info:
        zoo.create_model("davit_tiny", num_classes=5, checkpoint_path=path, device="meta")
    assert "head.fc.weight (1000, 768) vs (5, 768)" in str(info.value)


def test_export_reads_back_in_timm_and_zoo(davit_reference, tmp_path) -> None:
    reference, x, _ = davit_reference
    path = tmp_path / "official.pth"
    torch.save({"state_dict": _official_davit_state_dict(reference.state_dict())}, path)
    model = zoo.create_model(
        "davit_tiny", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), num_classes=4
    ).eval()
    out_dir = export_model(model, tmp_path / "export").path
    assert (out_dir / "model.safetensors").is_file() and (out_dir / "config.json").is_file()
    with torch.no_grad():
        expected = model(x)
        via_timm = timm.create_model(f"local-dir:{out_dir}", pretrained=True).eval()
        via_zoo = zoo.create_model(f"local-dir:{out_dir}", pretrained=True).eval()
        assert via_timm.num_classes == via_zoo.num_classes == 4
        assert torch.equal(via_timm(x), expected)
        assert torch.equal(via_zoo(x), expected)


SHARE_LINK = "https://127.0.0.1:9/v1.0/shares/s!abc/root/content"  # an official-style link, unreachable


def test_url_source_offline_names_the_cache_file() -> None:
    overlay = dict(hf_hub_id=None, url=SHARE_LINK)
    with pytest.raises(zoo.PretrainedWeightsUnavailableError, match=r"davit_tiny\.msft_in1k\.pth"):
        zoo.create_model("davit_tiny", pretrained=True, pretrained_cfg_overlay=overlay)


def test_url_source_served_from_the_cache(davit_reference, tmp_path) -> None:
    """A URL checkpoint already in the cache loads without the network, through the family filter."""
    reference, x, expected = davit_reference
    torch.save(
        {"state_dict": _official_davit_state_dict(reference.state_dict())}, tmp_path / "davit_tiny.msft_in1k.pth"
    )
    overlay = dict(hf_hub_id=None, url=SHARE_LINK)
    model = zoo.create_model("davit_tiny", pretrained=True, pretrained_cfg_overlay=overlay, cache_dir=tmp_path)
    with torch.no_grad():
        assert torch.equal(model.eval()(x), expected)
