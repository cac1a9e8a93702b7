"""OAT: sizes, positional table, decoding contract, data validation, metrics, and learning the coins task."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import zoo
import zoo.heads.scanpath as scanpath  # registers 'oat' until zoo.heads imports it
from zoo.data.scanpath import (
    ScanpathDataError,
    ScanpathDataset,
    read_scanpaths,
    synthetic_coins_search,
    write_scanpaths,
)
from zoo.train.scanpath import (
    behaviour_delta,
    behaviour_stats,
    edit_distance,
    evaluate_scanpaths,
    multimatch,
    predict,
    random_scanpaths,
    sequence_score,
    split_scanpaths,
    train_scanpath_model,
)

# a CPU-sized OAT for the learning test; the paper's sizes are checked separately
SMALL = dict(
    grid=(4, 6), d_model=128, pos_dim=64, pos_table_dim=22, num_encoder_layers=2, num_decoder_layers=2,
    dim_feedforward=256, pointer_dim=128, crop_size=(32, 32), dropout=0.0,
)  # fmt: skip
# with the original's position scale (rows of norm 8.764) the validation loss bottoms out at epoch 15 (1.148;
# 1.17 at 20 and 25, 1.48 at 30), so 30 epochs pick the same checkpoint as 45 did; with zoo's earlier unit-norm
# rows it took ~40 epochs (at 30 the model still looped on one coin in long searches)
EPOCHS = 30


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small ops on 2 shared cores: one thread is far faster than two
    yield
    torch.set_num_threads(threads)


def _grid_positions(rows: int, cols: int, batch: int) -> torch.Tensor:
    pos = torch.stack(torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij"), -1)
    return pos.view(1, rows * cols, 2).expand(batch, -1, -1)


def test_paper_sizes() -> None:
    model = zoo.create_model("oat")
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(model.appearance) == 374_752  # conv 1,216 + conv 4,640 + Linear(1440, 256) 368,896
    assert count(model.pointer) == 1_050_627  # 2 heads x 2 x Linear(512, 512) + Linear(2, 1)
    assert count(model.encoder) == pytest.approx(6.3e6, rel=0.01)
    assert count(model.decoder) == pytest.approx(10.5e6, rel=0.01)
    # the authors' parameters used in the forward (their unused generator and LinearEmbedding left out); no
    # final LayerNorms, as theirs; final_norm=True adds them (2 x 2 x 512)
    assert count(model) == 18_255_843 and model.encoder.norm is None and model.decoder.norm is None
    assert count(zoo.create_model("oat", final_norm=True)) == 18_255_843 + 2_048
    # their Amazon table's rows have norm 8.764: position weighs as much against appearance as in theirs
    torch.testing.assert_close(model.pos_table.norm(dim=1), torch.full((14,), 8.764), atol=1e-4, rtol=0)
    assert not any(p.requires_grad for p in model.buffers())
    assert (model.eos, model.pad, model.bos) == (84, 85, 86)
    with pytest.raises(RuntimeError, match="no pretrained weights"):
        zoo.create_model("oat", pretrained=True)


def test_gaussian_table_matches_the_shipped_one() -> None:
    table = scanpath.gaussian_similarity_table(14)
    unit = table / table.norm(dim=1, keepdim=True)
    cos = unit @ unit.t()
    # the Amazon table of the original: 0.883 / 0.607 / 0.325
    torch.testing.assert_close(cos[0, 1:4], torch.tensor([0.883, 0.607, 0.325]), atol=1e-3, rtol=0)
    assert table.shape == (14, 86) and torch.allclose(table.norm(dim=1), torch.ones(14), atol=1e-5)


def test_forward_generate_contract() -> None:
    model = zoo.create_model("oat", **SMALL).eval()
    B, P = 3, 24
    crops, positions = torch.rand(B, P, 3, 32, 32), _grid_positions(4, 6, B)
    mask = torch.ones(B, P, dtype=torch.bool)
    mask[2, 20:] = False  # a display with 20 objects
    target = torch.tensor([5, 0, 19])
    fixations = torch.tensor([[1, 2, 5], [0, -1, -1], [3, 19, -1]])
    logits = model(crops, positions, target, fixations, mask)
    assert logits.shape == (B, 4, P + 2)
    assert torch.isinf(logits[2, :, 20:24]).all()
    # the original's pad slot scores 0 in each pointer head: its logit is the mixing bias
    assert (logits[..., model.pad] == model.pointer.mix.bias).all() and model.pointer.mix.bias.abs() > 0
    zero_pad = zoo.create_model("oat", **SMALL, pad_logit="zero").eval()
    zero_pad.load_state_dict(model.state_dict())
    other = zero_pad(crops, positions, target, fixations, mask)
    assert (other[..., model.pad] == 0).all() and torch.equal(other[..., : model.pad], logits[..., : model.pad])
    assert model.decoder_targets(fixations).tolist() == [[1, 2, 5, 24], [0, 24, 25, 25], [3, 19, 24, 25]]
    greedy = model.generate(crops, positions, target, mask, max_len=6)
    sampled = model.generate(crops, positions, target, mask, max_len=6, sample=True, num_samples=4)
    assert len(greedy) == 3 and len(sampled) == 12
    assert all(1 <= len(s) <= 6 and all(0 <= o < P for o in s) for s in greedy + sampled)
    assert all(o < 20 for s in sampled[8:] for o in s)  # never a padded object
    with pytest.raises(ValueError, match="empty"):
        model(crops, positions, target, torch.full((B, 2), -1), mask)
    with pytest.raises(ValueError, match="padded"):
        model(crops, positions, target, torch.tensor([[1], [2], [22]]), mask)


def test_metrics() -> None:
    assert sequence_score([1, 2, 3], [1, 2, 3]) == 1.0
    assert sequence_score([1, 2, 3, 4], [1, 3]) == 0.5  # 2 aligned matches / longer length 4
    assert edit_distance([1, 2, 3], [1, 3]) == 1 and edit_distance([1, 2], [3, 4]) == 2
    stats = behaviour_stats([0, 1, 1, 2, 0, 5], target=5)
    assert stats == dict(target_found=1.0, length=6.0, search=4 / 6, refixation=1 / 6, revisit=1 / 6)
    assert behaviour_delta(stats, stats) == 0.0
    centres = np.array([[10.0 * i, 5.0 * (i % 3)] for i in range(6)])
    same = multimatch([0, 1, 2, 3], [0, 1, 2, 3], centres, (100, 50))
    assert all(v == pytest.approx(1.0) for v in same.values())
    assert np.isnan(multimatch([0, 1], [0, 1, 2], centres, (100, 50))["vector"])  # < 3 fixations


def test_reader_round_trip_and_bad_records(tmp_path) -> None:
    data = synthetic_coins_search(3, seed=1)
    path = write_scanpaths(data, tmp_path / "displays.json", tmp_path / "images")
    again = read_scanpaths(path)
    assert [s.fixations for s in again.scanpaths] == [s.fixations for s in data.scanpaths]
    item = ScanpathDataset(again, (32, 32))[0]
    assert item["crops"].shape == (24, 3, 32, 32) and item["crops"].max() <= 1.0
    doc = json.loads(path.read_text())

    def bad(mutate, match: str) -> None:
        d = json.loads(json.dumps(doc))
        mutate(d)
        p = tmp_path / "bad.json"
        p.write_text(json.dumps(d))
        with pytest.raises(ScanpathDataError, match=match):
            read_scanpaths(p)

    bad(lambda d: d["scanpaths"][1]["fixations"].append(99), r"scanpath #1 .*coins_0001.*object 99")
    bad(lambda d: d["displays"][2].pop("target"), r"display #2 .*coins_0002.* no target")
    bad(lambda d: d["displays"][1].update(target=77), r"coins_0001.*target 77 is not one of its object ids")
    bad(lambda d: d["displays"][1]["objects"][4].update(id=3), r"coins_0001.*object id 3 appears twice")
    bad(lambda d: d["scanpaths"][0].update(fixations=[]), r"scanpath #0 .* is empty")
    bad(lambda d: d["displays"][0]["objects"][3].update(row=9), r"coins_0000.*outside the 4x6 grid")
    bad(lambda d: d["scanpaths"][2].update(display="nope"), r"scanpath #2 .* display that does not exist")
    csv_path = tmp_path / "paths.csv"
    csv_path.write_text("display,subject,fixations\ncoins_0000,s1,3 4 5\ncoins_0001,s1,\n")
    with pytest.raises(ScanpathDataError, match=r"scanpath #1 \(display 'coins_0001', subject 's1'\) is empty"):
        read_scanpaths(path, csv_path)


def test_oat_learns_the_coins_search_task(tmp_path) -> None:
    data = synthetic_coins_search(150, seed=0)
    splits = split_scanpaths(data, seed=0)
    splits["val"] = splits["val"][:8]
    torch.manual_seed(0)
    model = zoo.create_model("oat", **SMALL)
    # the best checkpoint is chosen on the validation loss: the paper's monitor (behavioural delta of greedy
    # decodes) on 8 validation scanpaths picked the epoch-20 checkpoint of a 30-epoch run (delta 0.42 there,
    # 0.82 at epoch 30), an under-trained model that loops on one coin; that, not the metric, made the
    # delta no better than random (0.47 vs 0.46)
    # validation every 5 epochs: at every 15 the pick (epoch 30, past the minimum near 25) depended on float
    # rounding and sometimes looped on a fixed path (edit distance 15 instead of 10)
    result = train_scanpath_model(
        model, data, splits, epochs=EPOCHS, lr=1e-3, eval_every=5, patience=100, verbose=False,
        out_dir=tmp_path / "run", monitor="loss",
    )  # fmt: skip
    assert (tmp_path / "run" / "metrics.csv").is_file()
    refs = splits["test"]
    preds = predict(model, ScanpathDataset(data, model.crop_size, refs), [s.display for s in refs], result["max_len"])
    ours = evaluate_scanpaths(data, [p[0] for p in preds], refs)
    lengths = [len(s.fixations) for s in splits["train"]]
    # the random-fixation baseline of the paper: uniform objects, lengths drawn from the training scanpaths
    rand = evaluate_scanpaths(data, random_scanpaths([24] * len(refs), lengths, seed=0), refs)
    # measured (seed 0, greedy, 15 test scanpaths) ours vs random: SS 0.58 vs 0.17, edit distance 9.5 vs 17.6,
    # MultiMatch position 0.87 vs 0.71, direction 0.94 vs 0.62, behavioural delta 0.12 vs 0.46, target found 0.87
    # vs 0.0, revisits 0.0 vs 0.20 (zoo's earlier unit-norm table, 45 epochs: SS 0.57, delta 0.04)
    assert ours["sequence_score"] > rand["sequence_score"] + 0.2, (ours, rand)
    assert ours["edit_distance"] < rand["edit_distance"] - 3
    assert ours["multimatch_position"] > rand["multimatch_position"] + 0.05
    assert ours["multimatch_direction"] > rand["multimatch_direction"] + 0.1
    assert ours["behaviour_delta"] < rand["behaviour_delta"] - 0.1
    # per statistic: target found (0.87 vs 0.0) and revisits (0.0 vs 0.20) separate the two clearly; length
    # does not by construction (the baseline draws its lengths from the human ones), nor refixation (the
    # humans' 0.075 is close to random's chance rate of immediate repeats, ~1/24: 0.027 vs 0.022), so
    # those enter only through the delta over all five
    assert ours["model_target_found"] > rand["model_target_found"] + 0.5
    assert ours["model_revisit"] < rand["model_revisit"] - 0.1
