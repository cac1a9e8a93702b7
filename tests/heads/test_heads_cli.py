"""`zoo probe` and `zoo scanpath train|eval|predict` end to end on tiny settings (sub-parsers from add_cli)."""

from __future__ import annotations

import argparse
import csv
import json

import pytest
import torch

import zoo
import zoo.heads.probing  # noqa: F401  (registers the heads until zoo.heads imports them)
import zoo.heads.scanpath  # noqa: F401
from zoo.train import probe as probe_cli
from zoo.train import scanpath as scanpath_cli


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="zoo")
    sub = parser.add_subparsers(dest="command", required=True)
    probe_cli.add_cli(sub)
    scanpath_cli.add_cli(sub)
    return parser


def test_zoo_probe(tmp_path) -> None:
    argv = [
        "probe", "--backbone", "vit_tiny_patch16_224", "--backbone-kwargs",
        '{"img_size": 16, "patch_size": 4, "depth": 1}', "--img-size", "16", "--probes", "efficient_probe",
        "linear_probe_cls", "--epochs", "2", "--warmup-epochs", "1", "--batch-size", "512", "--chunk-size", "1024",
        "--cache", str(tmp_path / "cache"), "--out", str(tmp_path / "out"),
    ]  # fmt: skip
    args = _parser().parse_args(argv)
    assert args.func(args) == 0
    rows = list(csv.DictReader(open(tmp_path / "out" / "summary.csv")))
    assert [r["probe"] for r in rows] == ["efficient_probe", "linear_probe_cls"]
    assert int(rows[0]["trainable_params"]) == 32 * 192 + 192 * 192 + 192 * 10 + 10
    meta = json.loads((tmp_path / "cache" / "meta.json").read_text())
    assert meta["feature_dim"] == 192 and meta["num_prefix_tokens"] == 1 and meta["num_tokens"] == 17
    # another backbone on the same cache (into a new run folder): the cache refuses, naming the first one
    other = {"vit_tiny_patch16_224": "vit_small_patch16_224", str(tmp_path / "out"): str(tmp_path / "out2")}
    args = _parser().parse_args([other.get(a, a) for a in argv])
    with pytest.raises(probe_cli.TokenCacheMismatchError, match="vit_tiny_patch16_224"):
        args.func(args)


def test_zoo_scanpath(tmp_path, capsys) -> None:
    common = ["--data", "synthetic-coins", "--synthetic-displays", "20", "--seed", "0"]
    model_kwargs = json.dumps(dict(d_model=64, pos_dim=48, pos_table_dim=22, num_encoder_layers=1, num_decoder_layers=1,
                                   dim_feedforward=64, pointer_dim=64, crop_size=[32, 32]))  # fmt: skip
    out = tmp_path / "run"
    args = _parser().parse_args(
        ["scanpath", "train", *common, "--epochs", "2", "--model-kwargs", model_kwargs, "--out", str(out)]
    )
    assert args.func(args) == 0 and (out / "model_best.pt").is_file()
    # model_best.pt loads through the factory's checkpoint route with the keywords it stores
    best = torch.load(out / "model_best.pt", weights_only=True)
    model = zoo.create_model("oat", checkpoint_path=out / "model_best.pt", **best["model_kwargs"])
    assert model.state_dict().keys() == best["model"].keys()
    assert all(torch.equal(v, best["model"][k]) for k, v in model.state_dict().items())
    args = _parser().parse_args(["scanpath", "eval", *common, "--checkpoint", str(out / "model_best.pt"),
                                 "--out", str(tmp_path / "eval.json")])  # fmt: skip
    assert args.func(args) == 0
    metrics = json.loads((tmp_path / "eval.json").read_text())
    assert {"sequence_score", "edit_distance", "behaviour_delta", "multimatch_vector"} <= set(metrics["oat_greedy"])
    args = _parser().parse_args(["scanpath", "predict", *common, "--checkpoint", str(out / "model_best.pt"),
                                 "--samples", "2", "--max-len", "5", "--out", str(tmp_path / "pred.json")])  # fmt: skip
    assert args.func(args) == 0
    rows = json.loads((tmp_path / "pred.json").read_text())["scanpaths"]
    assert len(rows) == 40 and all(1 <= len(r["fixations"]) <= 5 for r in rows)
