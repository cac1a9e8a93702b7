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
