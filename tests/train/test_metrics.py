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
