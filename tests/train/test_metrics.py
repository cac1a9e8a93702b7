"""Progress lines without a TTY, CSV writer, curves PNG."""

import io

import pytest

from zoo.train.metrics import CSVWriter, MetricLogger, Progress, plot_curves


def test_progress_plain_lines_when_not_a_tty():
    stream = io.StringIO()
    with Progress(5, "train 1/1", every=2, stream=stream) as bar:
        for _ in range(5):
            bar.update(loss=0.5)
    lines = stream.getvalue().splitlines()
    assert len(lines) == 3 and lines[-1].startswith("train 1/1 [5/5]") and "loss 0.5" in lines[-1]
    silent = io.StringIO()
    Progress(3, enabled=False, stream=silent).update(3)
    assert silent.getvalue() == ""


def test_csv_and_curves(tmp_path):
    logger = MetricLogger(tmp_path)
    for epoch in (1, 2, 3):
        logger.log(
            dict(epoch=epoch, train_loss=1.0 / epoch, val_loss=1.2 / epoch, val_acc1=30.0 * epoch), step=epoch * 10
        )
    logger.close()
    rows = (tmp_path / "metrics.csv").read_text().splitlines()
    assert rows[0] == "epoch,train_loss,val_loss,val_acc1,step" and len(rows) == 4
    CSVWriter(tmp_path / "metrics.csv").write(dict(epoch=4, train_loss=0.2, val_loss=0.3, val_acc1=95, step=40))
    assert (tmp_path / "metrics.csv").read_text().count("epoch") == 1  # appended under the same header
    pytest.importorskip("matplotlib")
    png = plot_curves(tmp_path / "metrics.csv", tmp_path / "curves.png")
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_unknown_backend():
    with pytest.raises(ValueError, match="unknown log backend"):
        MetricLogger("unused", backends=["csv", "neptune"])


def test_tensorboard_backend(tmp_path):
    pytest.importorskip("tensorboard")
    logger = MetricLogger(tmp_path, backends=["csv", "tensorboard"], run_name="r")
    logger.log(dict(epoch=1, val_acc1=50.0), step=1)
    logger.close()
    assert list((tmp_path / "tb" / "r").glob("events.out.tfevents.*"))


def test_step_loss_and_lr_reach_tensorboard(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from ._common import run_trainer, tiny_train_config

    out = tmp_path / "run"
    run_trainer(tiny_train_config(out, log={"backends": ["csv", "tensorboard"]}, loop={"max_steps": 3}))
    events = EventAccumulator(str(out / "tb"))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3]
    assert [e.step for e in events.Scalars("train/lr")] == [1, 2, 3]
    assert "val_loss" in events.Tags()["scalars"]


def test_wandb_resumes_its_run(tmp_path, monkeypatch):
    """One wandb run across a restart: the id is stored in the checkpoint and passed back with resume='allow'."""
    import sys
    import types

    from ._common import run_trainer, tiny_train_config

    inits, logged = [], []

    class Run:
        def log(self, row, step):
            logged.append((step, row))

        def finish(self):
            pass

    fake = types.ModuleType("wandb")
    fake.init = lambda **kwargs: inits.append(kwargs) or Run()
    fake.util = types.SimpleNamespace(generate_id=lambda: "run-abc123")
    monkeypatch.setitem(sys.modules, "wandb", fake)
    out = tmp_path / "run"
    run_trainer(tiny_train_config(out, log={"backends": ["wandb"]}, loop={"max_steps": 2}))
    run_trainer(tiny_train_config(out, log={"backends": ["wandb"]}, loop={"max_steps": 4},
                                  checkpoint={"resume": "auto"}))  # fmt: skip
    assert [(i["id"], i["resume"]) for i in inits] == [("run-abc123", "allow")] * 2
    assert all("reinit" not in i for i in inits)
    assert [s for s, row in logged if "train/loss" in row] == [1, 2, 3, 4]
