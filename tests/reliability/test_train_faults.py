"""Hostile and careless inputs to the training tasks: no file runs code, no run loses or mixes data, no
silently wrong result, names stay in their folders, a user's mistake is one line and exit code 2.

Each test here failed on the code before the "trustworthy runs" change; ``docs/reliability.md`` lists the
classes of bad input and what each gets.
"""

from __future__ import annotations

import csv
import json
import pathlib
import stat

import pytest
import torch
from train._common import TINY_BIFORMER, run_trainer, tiny_train_config

from zoo import _io
from zoo.cli import main as zoo_main
from zoo.train import loop as loop_lib
from zoo.train.checkpoint import CheckpointManager, RunFolderError, UnsafeFileError, atomic_save
from zoo.train.config import ConfigTypeError
from zoo.train.loop import Trainer


class Payload:
    """Unpickling this runs ``Path.touch(marker)``: the stand-in for any code a planted file could run."""

    def __init__(self, marker: pathlib.Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


@pytest.fixture
def marker(tmp_path) -> pathlib.Path:
    return tmp_path / "PAYLOAD_RAN"


def plant(path: pathlib.Path, marker: pathlib.Path, **entries) -> pathlib.Path:
    """A checkpoint-shaped file whose unpickling would run code."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(dict(entries, payload=Payload(marker)), path)
    return path


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err, err
    assert len(lines) == 1, err
    return lines[0]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> pathlib.Path:
    """One finished tiny run (1 epoch, 8 steps, checkpoint per step): OUT with checkpoints/ and metrics."""
    out = tmp_path_factory.mktemp("trained") / "run"
    cfg = tiny_train_config(out, checkpoint={"every_steps": 1, "keep_last": 0})
    run_trainer(cfg)
    return out


def copy_run(src: pathlib.Path, dst: pathlib.Path) -> pathlib.Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


# ------------------------------------------------------------------------------------ 1. no file runs code


def test_planted_payload_would_run_with_plain_pickle(tmp_path, marker):
    """The payload is real: loading it the unsafe way runs it (so the tests below can fail)."""
    path = plant(tmp_path / "evil.pt", marker)
    torch.load(path, weights_only=False)
    assert marker.exists()


def test_validate_refuses_a_pickle_checkpoint(tmp_path, marker, capsys):
    path = plant(tmp_path / "evil.pt", marker, model={"w": torch.zeros(1)})
    rc = zoo_main(["validate", "biformer_tiny", "--checkpoint", str(path), "--data", "digits", "--workers", "0"])
    line = one_error_line(capsys)
    assert rc == 2 and not marker.exists()
    assert str(path) in line and "refused" in line and "weights_only=False" not in line


def test_resume_file_and_auto_refuse_a_pickle_checkpoint(tmp_path, marker, trained):
    out = copy_run(trained, tmp_path / "run")
    evil = plant(tmp_path / "elsewhere" / "evil.pt", marker, step=3, model={})
    cfg = tiny_train_config(tmp_path / "fresh", checkpoint={"resume": str(evil)})
    with pytest.raises(UnsafeFileError, match="evil.pt"):
        run_trainer(cfg)
    # the newest checkpoint of a run folder replaced by a payload: --resume auto refuses, no silent fallback
    newest = sorted((out / "checkpoints").glob("ckpt_0*.pt"))[-1]
    plant(newest, marker, step=8, model={})
    cfg = tiny_train_config(out, checkpoint={"resume": "auto", "every_steps": 1, "keep_last": 0})
    with pytest.raises(UnsafeFileError, match=newest.name):
        run_trainer(cfg)
    assert not marker.exists()


def test_fresh_run_reading_a_planted_best_checkpoint(tmp_path, marker):
    """The best checkpoint read at the start of a run (to keep comparing against it) runs nothing."""
    out = tmp_path / "run"
    plant(out / "checkpoints" / "ckpt_best.pt", marker, metric=99.0, model={})
    with pytest.raises((UnsafeFileError, RunFolderError)):
        run_trainer(tiny_train_config(out))
    with pytest.raises(UnsafeFileError, match="ckpt_best.pt"):
        run_trainer(tiny_train_config(out, checkpoint={"resume": "auto"}))
    assert not marker.exists()


def test_task_checkpoints_load_weights_only(tmp_path, marker):
    """MIL, fine-tune, probe and scanpath resume through the same manager; their files round-trip safely."""
    from zoo.train.probe import TokenCache, TokenCacheMismatchError

    cache = TokenCache(tmp_path / "cache")
    cache.check_or_write_meta(
        dict(backbone="b", feature_dim=4, num_tokens=2, img_size=8, data="d", chunk_size=2, splits={"train": 2})
    )
    plant(cache.chunk_path("train", 0), marker, tokens=torch.zeros(2, 2, 4), labels=torch.zeros(2))
    with pytest.raises(UnsafeFileError, match="chunk_00000.pt"):
        cache.load("train")
    assert not marker.exists()
    # a split name in meta.json that would leave the cache folder
    (tmp_path / "cache" / "meta.json").write_text(json.dumps(dict(splits={"../../outside": 2}, chunk_size=2)))
    with pytest.raises(_io.UnsafePathError, match="outside"):
        cache.load("../../outside")
    with pytest.raises(TokenCacheMismatchError):
        (tmp_path / "cache" / "meta.json").write_text("{not json")
        cache.load("train")


def test_scanpath_eval_refuses_a_pickle_checkpoint(tmp_path, marker, capsys):
    path = plant(tmp_path / "model_best.pt", marker, model={}, model_kwargs={}, max_len=3)
    rc = zoo_main(["scanpath", "eval", "--data", "synthetic-coins", "--synthetic-displays", "4",
                   "--checkpoint", str(path)])  # fmt: skip
    assert rc == 2 and not marker.exists() and "model_best.pt" in one_error_line(capsys)


def test_our_checkpoints_load_with_weights_only(trained):
    """Everything a run stores (RNG states, optimizer, scheduler, scaler, config, metrics) is plain data."""
    for path in (trained / "checkpoints").glob("*.pt"):
        state = torch.load(path, weights_only=True)
        assert {"model", "optimizer", "scheduler", "rng", "config", "metrics", "epoch_totals"} <= set(state)


# --------------------------------------------------------------------------------- 2. nothing lost or mixed


def test_fresh_run_into_a_used_folder_refuses_then_overwrite_starts_clean(tmp_path, trained, capsys):
    out = copy_run(trained, tmp_path / "run")
    before = sorted(p.name for p in (out / "checkpoints").iterdir())
    with pytest.raises(RunFolderError, match=r"--resume auto.*--overwrite"):
        run_trainer(tiny_train_config(out))
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == before  # nothing touched
    rc = zoo_main(["train", "--model", "biformer_tiny", "--data", "digits", "--out", str(out)])
    assert rc == 2 and "--overwrite" in one_error_line(capsys)
    # --overwrite: the old run's checkpoints and rows are gone, the new run's alone remain
    cfg = tiny_train_config(out, schedule={"epochs": 1}, loop={"max_steps": 2}, checkpoint={"overwrite": True})
    run_trainer(cfg)
    steps = [int(r["step"]) for r in csv.DictReader(open(out / "metrics.csv"))]
    assert steps == [2]
    assert [p.name for p in (out / "checkpoints").glob("ckpt_0*.pt")] == ["ckpt_00000002.pt"]


def test_keep_last_never_deletes_the_newest_own_checkpoint(tmp_path):
    """A folder with another run's higher step numbers: pruning must not delete the file just written."""
    mgr = CheckpointManager(tmp_path, keep_last=1)
    atomic_save({"step": 50}, tmp_path / "ckpt_00000050.pt")
    path = mgr.save({"w": torch.ones(1)}, step=3)
    assert path.is_file()
    mgr.save({"w": torch.ones(1)}, step=4)
    assert (tmp_path / "ckpt_00000004.pt").is_file() and not (tmp_path / "ckpt_00000003.pt").exists()


def test_resume_file_behind_newer_checkpoints_is_refused(tmp_path, trained):
    out = copy_run(trained, tmp_path / "run")
    older = out / "checkpoints" / "ckpt_00000003.pt"
    with pytest.raises(RunFolderError, match="newer checkpoints"):
        run_trainer(tiny_train_config(out, checkpoint={"resume": str(older)}))


def test_resume_auto_on_a_finished_run_does_nothing(tmp_path, trained, monkeypatch):
    out = copy_run(trained, tmp_path / "run")
    listing = {p: (p.stat().st_mtime_ns, p.stat().st_size) for p in out.rglob("*")}
    monkeypatch.setattr(Trainer, "train_epoch", lambda self: pytest.fail("a finished run trained again"))
    _, metrics = run_trainer(tiny_train_config(out, checkpoint={"resume": "auto", "every_steps": 1,
                                                                 "keep_last": 0}))  # fmt: skip
    assert {p: (p.stat().st_mtime_ns, p.stat().st_size) for p in out.rglob("*")} == listing
    assert metrics["val_acc1"] == pytest.approx(float(list(csv.DictReader(open(out / "metrics.csv")))[-1]["val_acc1"]))


def test_interrupted_epoch_logs_the_same_train_loss(tmp_path, trained, monkeypatch):
    """Killed at step 5 of 8 (after its checkpoint), resumed: the epoch's logged loss equals the uninterrupted one."""
    out = tmp_path / "run"
    real_save = Trainer.save

    def save_then_die(self, metric=None):
        real_save(self, metric)
        if self.state.step == 5:
            raise KeyboardInterrupt  # as a kill right after the checkpoint

    monkeypatch.setattr(Trainer, "save", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        run_trainer(tiny_train_config(out, checkpoint={"every_steps": 1, "keep_last": 0}))
    monkeypatch.setattr(Trainer, "save", real_save)
    run_trainer(tiny_train_config(out, checkpoint={"resume": "auto", "every_steps": 1, "keep_last": 0}))
    resumed = list(csv.DictReader(open(out / "metrics.csv")))
    reference = list(csv.DictReader(open(trained / "metrics.csv")))
    assert len(resumed) == 1 and resumed[0]["train_loss"] == reference[0]["train_loss"]


def test_interrupted_save_temporaries_are_cleaned(tmp_path, trained):
    out = copy_run(trained, tmp_path / "run")
    ckpts = out / "checkpoints"
    stale = [ckpts / ".ckpt_00000009.pt.999999.abcd1234.tmp", ckpts / ".ckpt_00000009.pt.k2j3h4.tmp"]
    for path in stale:
        path.write_bytes(b"half a checkpoint")
    CheckpointManager(ckpts)
    assert not any(p.exists() for p in stale)


def test_rows_logged_after_the_last_checkpoint_are_not_duplicated(tmp_path, trained):
    """Killed between a metrics row and its checkpoint: the resumed run logs that row once, not twice."""
    out = copy_run(trained, tmp_path / "run")
    (out / "checkpoints" / "ckpt_00000008.pt").unlink()  # the row of step 8 is logged, its checkpoint lost
    run_trainer(tiny_train_config(out, checkpoint={"resume": "auto", "every_steps": 1, "keep_last": 0}))
    steps = [r["step"] for r in csv.DictReader(open(out / "metrics.csv"))]
    assert steps == ["8"]


def test_written_files_have_normal_permissions(tmp_path, trained):
    expected = _io.FILE_MODE
    for path in [*(trained / "checkpoints").iterdir(), trained / "config.yaml"]:
        assert stat.S_IMODE(path.stat().st_mode) == expected, path


# ------------------------------------------------------------------------------- 3. no silently wrong result


def test_validate_refuses_empty_foreign_and_missing_weights(tmp_path, trained, capsys):
    empty = tmp_path / "empty.pt"
    torch.save({}, empty)
    other = tmp_path / "other.pt"
    torch.save({"model": {"fc.weight": torch.zeros(3, 3)}}, other)
    common = ["--data", "digits", "--workers", "0", "--limit", "8", "--model-kwargs", TINY_BIFORMER]
    for ckpt, expected in ((empty, "no weights"), (other, "does not fit")):
        rc = zoo_main(["validate", "biformer_tiny", "--checkpoint", str(ckpt), *common])
        line = one_error_line(capsys)
        assert rc == 2 and expected in line and str(ckpt) in line
    rc = zoo_main(["validate", "biformer_tiny", *common])  # no weights at all: not random-weights accuracy
    assert rc == 2 and "--checkpoint" in one_error_line(capsys)
    best = trained / "checkpoints" / "ckpt_best.pt"
    rc = zoo_main(["validate", "davit_tiny", "--checkpoint", str(best), *common[:-2]])
    assert rc == 2 and "biformer_tiny" in one_error_line(capsys)


def test_resume_with_another_architecture_is_one_clear_error(tmp_path, trained, capsys):
    out = copy_run(trained, tmp_path / "run")
    rc = zoo_main(["train", "--model", "davit_tiny", "--data", "digits", "--out", str(out), "--resume", "auto"])
    assert rc == 2 and "biformer_tiny" in one_error_line(capsys)


# ---------------------------------------------------------------------------------------- 4. paths stay home


@pytest.mark.parametrize("bad", ["../outside.png", "/etc/hostname", "sub/../../outside.png", ""])
def test_finetune_csv_paths_stay_in_their_folder(tmp_path, bad):
    from zoo.train.finetune import FinetuneConfig, read_label_csv

    (tmp_path / "data").mkdir()
    rows = [("a.png", "x"), ("b.png", "y"), (bad, "x")]
    (tmp_path / "data" / "labels.csv").write_text("path,label\n" + "".join(f"{p},{c}\n" for p, c in rows))
    cfg = FinetuneConfig(data=str(tmp_path / "data" / "labels.csv"), out=str(tmp_path / "run"))
    with pytest.raises(_io.UnsafePathError, match="line 4"):
        read_label_csv(cfg)


def test_scanpath_display_images_stay_in_their_folder(tmp_path):
    from zoo.data.scanpath import read_scanpaths

    objects = [dict(id=i, box=[i * 10, 0, i * 10 + 8, 8], row=0, col=i) for i in range(2)]
    for image in ("../secret.png", "/etc/hostname"):
        doc = dict(displays=[dict(id="d0", image=image, grid=[1, 2], target=0, objects=objects)], scanpaths=[])
        (tmp_path / "displays.json").write_text(json.dumps(doc))
        with pytest.raises(_io.UnsafePathError, match="display #0"):
            read_scanpaths(tmp_path / "displays.json")


def test_plain_names_and_confined_paths():
    for bad in ("..", "../x", "/abs", "a/b", "a\\b", "", "  "):
        with pytest.raises(_io.UnsafePathError):
            _io.plain_name(bad, "slide id", "labels.csv line 2")
    assert _io.plain_name("TCGA-01.A") == "TCGA-01.A"
    assert _io.confined_path("/data", "sub/x.png") == pathlib.Path("/data/sub/x.png")


# ------------------------------------------------------------------------------ 5. user mistakes: one line


def recipe(tmp_path, text: str) -> str:
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize(
    "case",
    ["unknown_model", "bad_type", "malformed_yaml", "empty_yaml", "recipe_is_folder", "out_under_file", "bad_kwargs"],
)
def test_train_mistakes_are_one_line(tmp_path, capsys, monkeypatch, case):
    monkeypatch.setattr(loop_lib.data_lib, "build_datasets", lambda *a: pytest.fail("work started"))
    base = ["train", "--data", "digits", "--out", str(tmp_path / "run")]
    (tmp_path / "file").write_text("x")
    argv = {
        "unknown_model": [*base, "--model", "biformer_tinny"],
        "bad_type": [*base, "--config", recipe(tmp_path, "schedule: {epochs: ten}\n")],
        "malformed_yaml": [*base, "--config", recipe(tmp_path, "optim: {lr: [1,\n")],
        "empty_yaml": [*base, "--config", recipe(tmp_path, "")],
        "recipe_is_folder": [*base, "--config", str(tmp_path)],
        "out_under_file": ["train", "--data", "digits", "--out", str(tmp_path / "file" / "run")],
        "bad_kwargs": [*base, "--model.kwargs", "[1, 2"],
    }[case]
    assert zoo_main(argv) == 2
    line = one_error_line(capsys)
    assert "error" in line


def test_recipe_values_are_type_checked_when_the_config_is_built(tmp_path):
    from zoo.train.config import Config, apply_overrides

    cfg = apply_overrides(Config(), {"optim": {"lr": "1e-3"}, "schedule": {"epochs": 3.0}})  # YAML's quirks
    assert cfg.optim.lr == 1e-3 and cfg.schedule.epochs == 3
    for bad in ({"schedule": {"epochs": "ten"}}, {"loop": {"amp": True}}, {"aug": {"scale": "a,b"}},
                {"model": {"kwargs": [1]}}, {"loop": {"batch_size": 0}}, {"schedule": {"epochs": None}}):  # fmt: skip
        with pytest.raises(ConfigTypeError):
            apply_overrides(Config(), bad)


def test_disk_full_is_one_line(tmp_path, capsys, monkeypatch):
    import errno

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full)
    argv = ["train", "--model", "biformer_tiny", "--model.kwargs", TINY_BIFORMER, "--data", "digits",
            "--data.img_size", "16", "--data.limit_train", "32", "--data.limit_val", "16", "--data.num_workers", "0",
            "--batch-size", "16", "--epochs", "1", "--loop.threads", "1", "--out", str(tmp_path / "run")]  # fmt: skip
    assert zoo_main(argv) == 2
    assert "No space left on device" in one_error_line(capsys)
    assert not [p for p in (tmp_path / "run").rglob("*.tmp")]


def test_debug_flag_and_env_show_the_traceback(tmp_path, monkeypatch):
    argv = ["train", "--model", "biformer_tinny", "--data", "digits", "--out", str(tmp_path / "r")]
    with pytest.raises(loop_lib.ConfigError):
        zoo_main([*argv, "--debug"])
    monkeypatch.setenv("ZOO_DEBUG", "1")
    with pytest.raises(loop_lib.ConfigError):
        zoo_main(argv)


def test_argparse_errors_are_one_line(capsys):
    assert zoo_main(["train", "--epochs", "ten"]) == 2
    assert "ten" in one_error_line(capsys)


def test_task_json_kwargs_are_one_line(tmp_path, capsys):
    rc = zoo_main(["probe", "--backbone-kwargs", "{bad", "--out", str(tmp_path / "p"), "--cache", str(tmp_path)])
    assert rc == 2 and "--backbone-kwargs" in one_error_line(capsys)


def test_export_and_mil_missing_inputs_are_one_line(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    assert zoo_main(["export", "resnet18", "--out", str(tmp_path / "file")]) == 2
    assert "is a file" in one_error_line(capsys)
    assert zoo_main(["export", "abmil", "--out", str(tmp_path / "head")]) == 2  # heads: not timm's layout
    assert "abmil is a mil_head" in one_error_line(capsys)
    labels = tmp_path / "labels.csv"
    assert zoo_main(["mil", "train", "--features", str(tmp_path), "--labels", str(labels)]) == 2
    assert f"label CSV {labels} does not exist" in one_error_line(capsys)
    labels.write_text("slide_id,label\n")
    assert zoo_main(["mil", "train", "--features", str(tmp_path / "none"), "--labels", str(labels)]) == 2
    assert "feature folder" in one_error_line(capsys)


def test_unexpected_errors_still_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(loop_lib, "train", lambda cfg: [][1])
    rc = zoo_main(["train", "--out", str(tmp_path / "r")])
    line = one_error_line(capsys)
    assert rc == 2 and "IndexError" in line and "--debug" in line


def test_yaml_recipe_file_loads_only_plain_data(tmp_path, marker):
    """A recipe with a Python-object tag is an error, never an object (safe_load)."""
    path = recipe(tmp_path, f"model: !!python/object/apply:pathlib.Path.touch [{str(marker)!r}]\n")
    with pytest.raises(ConfigTypeError):
        from zoo.train.config import load_recipe

        load_recipe(path)
    assert not marker.exists()


# ------------------------------------------------------------- the same run-folder rules for every task


def _mil_data(root: pathlib.Path) -> list[str]:
    """Six slides' feature files (random, two classes) and labels.csv; the `zoo mil train` flags."""
    import h5py
    import numpy as np

    rng = np.random.default_rng(0)
    feats = root / "features"
    feats.mkdir(parents=True)
    rows = ["slide_id,label,split"]
    for i in range(6):
        with h5py.File(feats / f"s{i}.h5", "w") as f:
            f.create_dataset("features", data=rng.normal(i % 2, 1, (5, 8)).astype(np.float16))
            f.create_dataset("coords", data=np.zeros((5, 2), np.int64))
            f.attrs.update(complete=True, backbone="test", feature_dim=8)
        rows.append(f"s{i},{i % 2},{('train', 'train', 'val', 'val', 'test', 'test')[i]}")
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    return ["mil", "train", "--features", str(feats), "--labels", str(root / "labels.csv"), "--epochs", "2",
            "--heatmaps", "0"]  # fmt: skip


def _finetune_data(root: pathlib.Path) -> list[str]:
    import numpy as np
    from PIL import Image

    root.mkdir(parents=True)
    rows = ["path,label"]
    for i in range(12):
        Image.fromarray(np.full((24, 24), 40 + 160 * (i % 2), np.uint8)).save(root / f"{i}.png")
        rows.append(f"{i}.png,{'ab'[i % 2]}")
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    return ["finetune", "--task", "cxr", "--data", str(root / "labels.csv"), "--model", "resnet18", "--img-size",
            "32", "--epochs", "2", "--batch-size", "4", "--workers", "0", "--in-chans", "1"]  # fmt: skip


def _probe_args(root: pathlib.Path) -> list[str]:
    return ["probe", "--backbone", "vit_tiny_patch16_224", "--backbone-kwargs",
            '{"img_size": 16, "patch_size": 4, "depth": 1}', "--img-size", "16", "--probes", "linear_probe_avg",
            "--epochs", "2", "--warmup-epochs", "1", "--batch-size", "512", "--chunk-size", "1024",
            "--cache", str(root / "cache")]  # fmt: skip


def _scanpath_args(root: pathlib.Path) -> list[str]:
    kwargs = json.dumps(dict(d_model=32, pos_dim=16, pos_table_dim=8, num_encoder_layers=1, num_decoder_layers=1,
                             dim_feedforward=32, pointer_dim=32, crop_size=[32, 32]))  # fmt: skip
    return ["scanpath", "train", "--data", "synthetic-coins", "--synthetic-displays", "10", "--epochs", "2",
            "--model-kwargs", kwargs]  # fmt: skip


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops on shared cores
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("task", ["mil", "finetune", "probe", "scanpath"])
def test_task_run_folders(tmp_path, capsys, one_thread, task):
    """Fresh run into a used folder: refused; --resume auto when finished: nothing written; --overwrite: clean."""
    make = {"mil": _mil_data, "finetune": _finetune_data, "probe": _probe_args, "scanpath": _scanpath_args}[task]
    argv = [*make(tmp_path / "data"), "--out", str(tmp_path / "run")]
    assert zoo_main(argv) == 0, capsys.readouterr().err
    capsys.readouterr()
    files = {p: (p.stat().st_mtime_ns, p.stat().st_size) for p in (tmp_path / "run").rglob("*")}
    assert zoo_main(argv) == 2 and "--overwrite" in one_error_line(capsys)
    assert zoo_main([*argv, "--resume", "auto"]) == 0
    assert "nothing to do" in capsys.readouterr().out
    assert {p: (p.stat().st_mtime_ns, p.stat().st_size) for p in (tmp_path / "run").rglob("*")} == files
    assert zoo_main([*argv, "--overwrite"]) == 0, capsys.readouterr().err
    metrics = list(csv.DictReader(open(next((tmp_path / "run").rglob("metrics.csv")))))
    assert len(metrics) == 2  # the new run's two epochs, not appended to the old run's rows
    # the task's resume read is weights-only too: a payload planted as its newest checkpoint runs nothing
    marker = tmp_path / "PAYLOAD_RAN"
    newest = sorted((tmp_path / "run").rglob("ckpt_0*.pt"))[-1]
    plant(newest, marker, step=1, epoch=1, model={})
    capsys.readouterr()
    assert zoo_main([*argv, "--resume", str(newest)]) == 2
    assert newest.name in one_error_line(capsys) and not marker.exists()
