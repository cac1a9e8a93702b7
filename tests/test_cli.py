"""The ``zoo`` command and the tools behind it (info, cards, bench, export)."""

from __future__ import annotations

import csv

import pytest
import timm
import torch

import zoo
from zoo.cli import main
from zoo.tools.cards import render_card
from zoo.tools.info import model_info


def test_list(capsys) -> None:
    assert main(["list", "davit*"]) == 0
    assert capsys.readouterr().out.split() == zoo.list_models("davit*")
    assert main(["list", "no_such*"]) == 1


def test_info_counts_params_and_gmacs(capsys) -> None:
    info = model_info("davit_tiny")
    assert info.params == 28_360_168  # the official file's count, equal to timm's
    assert info.gmacs == pytest.approx(4.52, abs=0.05)  # FlopCounterMode / 2 at 224 (official: 4.5 GFLOPs)
    assert [f["reduction"] for f in info.feature_info] == [4, 8, 16, 32]
    assert info.tags["davit_tiny.msft_in1k"]["source"] == "hf-hub:timm/davit_tiny.msft_in1k"
    assert main(["info", "davit_tiny", "--no-gmacs"]) == 0
    out = capsys.readouterr().out
    assert "28,360,168" in out and "stride 32" in out and "apache-2.0" in out


def test_card_for_every_family_member(tmp_path) -> None:
    card = render_card("davit_tiny")
    for needle in ("# davit_tiny", "arXiv:2204.03645", "28,360,168", "| 3 | `stages.3` | 768 | 32 |", "82.694",
                   "features_only=True", "@inproceedings{ding2022davit"):  # fmt: skip
        assert needle in card, needle
    assert main(["card", "davit_small", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "davit_small.md").read_text().startswith("# davit_small")
    assert main(["card", "resnet50", "--out", str(tmp_path)]) == 2  # not a zoo architecture


def test_card_lists_the_det_seg_configs_with_reported_numbers() -> None:
    card = render_card("biformer_small")
    assert "## Detection and segmentation" in card
    assert "`zoo/detection/configs/maskrcnn_biformer_small_1x_coco.py` | box AP 47.8 / mask AP 43.2" in card
    assert "upernet_biformer_small_160k_ade20k.py` | mIoU 49.8" in card
    assert "## Detection and segmentation" not in render_card("biformer_tiny")  # no config uses it


def test_bench_prints_ratios_and_writes_csv(tmp_path, capsys) -> None:
    out = tmp_path / "bench.csv"
    argv = ["bench", "davit_tiny", "--vs", "resnet10t", "-b", "2", "--img-size", "64", "--iters", "1", "--warmup",
            "0", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "ratios to resnet10t" in printed
    rows = list(csv.DictReader(out.open()))
    assert [r["model"] for r in rows] == ["davit_tiny", "resnet10t"]
    assert float(rows[1]["infer_time_ratio"]) == 1.0 and float(rows[0]["infer_time_ratio"]) > 0
    assert float(rows[0]["train_peak_mib"]) > 0


def test_export_command_reads_back_in_timm(tmp_path) -> None:
    out_dir = tmp_path / "davit_export"
    assert main(["export", "davit_tiny", "--out", str(out_dir), "--num-classes", "3"]) == 0
    model = timm.create_model(f"local-dir:{out_dir}", pretrained=True).eval()
    assert model.num_classes == 3
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 3)


@pytest.mark.parametrize("kind", ["backbone", "mil_head", "probe"])
def test_card_usage_snippet_runs(kind: str) -> None:
    """The usage snippet of a card is real code: it runs as printed."""
    import re

    name = min(zoo.list_models(kind=kind), key=len) if kind != "backbone" else "davit_tiny"
    code = re.search(r"```python\n(.*?)```", render_card(name), re.S).group(1)
    exec(compile(code, f"<card {name}>", "exec"), {})


def test_help_lists_every_subcommand(capsys) -> None:
    from zoo.cli import build_parser

    parser = build_parser()
    verbs = next(a for a in parser._actions if a.dest == "command").choices
    assert set(verbs) >= {"list", "train", "validate", "wsi", "mil", "probe", "scanpath", "finetune", "det", "seg"}
    missing = [v for v in verbs if f" {v}," not in parser.description and f" {v}." not in parser.description]
    assert not missing, f"`zoo --help` does not name {missing}"


@pytest.mark.parametrize(("name", "needs_zoo"), [("halonet26t", False), ("davit_tiny", False), ("biformer_tiny", True)])
def test_export_reads_back_the_way_the_output_says(tmp_path, capsys, name: str, needs_zoo: bool) -> None:
    """timm architectures load in plain timm (a fresh process without zoo); zoo-only ones after `import zoo`."""
    import subprocess
    import sys

    out_dir = tmp_path / name
    assert main(["export", name, "--out", str(out_dir), "--num-classes", "3"]) == 0
    said = capsys.readouterr().out
    assert ("`import zoo` first" in said) == needs_zoo and ("no zoo needed" in said) != needs_zoo
    load = f"import timm; m = timm.create_model('local-dir:{out_dir}', pretrained=True); print(type(m).__module__)"
    plain = subprocess.run([sys.executable, "-c", load], capture_output=True, text=True, timeout=120)
    if needs_zoo:
        assert plain.returncode != 0 and "Unknown model" in plain.stderr
        with_zoo = subprocess.run([sys.executable, "-c", "import zoo; " + load], capture_output=True, text=True,
                                  timeout=120)  # fmt: skip
        assert with_zoo.returncode == 0 and with_zoo.stdout.strip().startswith("zoo."), with_zoo.stderr[-2000:]
    else:
        assert plain.returncode == 0 and plain.stdout.strip().startswith("timm."), plain.stderr[-2000:]


def test_export_of_zoo_only_keywords_under_a_timm_name_is_refused(tmp_path) -> None:
    from zoo.tools.export import export_model

    model = zoo.create_model("halonet26t", num_classes=3, halo_pad_mask=True)
    with pytest.raises(ValueError, match="no equivalent in timm's own halonet26t"):
        export_model(model, tmp_path / "x")


def test_zoo_classes_under_timm_names_is_an_opt_in(tmp_path) -> None:
    """Default: timm's own HaloNet (block-grid sizes only); opt-in: zoo's any-size HaloNet, also through smp."""
    assert type(timm.create_model("halonet26t")).__module__.startswith("timm.")
    try:
        assert "halonet26t" in zoo.use_zoo_in_timm("halonet26t")
        model = timm.create_model("halonet26t", num_classes=3).eval()
        assert type(model).__module__ == "zoo.models.halonet"
        assert model(torch.randn(1, 3, 200, 168)).shape == (1, 3)  # not a multiple of the 256-px grid
        smp = pytest.importorskip("segmentation_models_pytorch", reason="segmentation_models_pytorch not installed")
        seg = smp.Unet(encoder_name="tu-halonet26t", encoder_weights=None, classes=2).eval()
        assert any(type(m).__module__.startswith("zoo.") for m in seg.encoder.modules())
        assert seg(torch.randn(1, 3, 160, 96)).shape == (1, 2, 160, 96)
    finally:
        zoo.restore_timm()
    assert type(timm.create_model("halonet26t")).__module__.startswith("timm.")
