"""WebDataset shards as a training source (optional extra)."""

import io

import numpy as np
import pytest
import yaml
from PIL import Image

from zoo.train.config import Config
from zoo.train.loop import train

from ._common import TINY_BIFORMER


def test_webdataset_source(tmp_path):
    wds = pytest.importorskip("webdataset")
    rng = np.random.default_rng(0)
    with wds.TarWriter(str(tmp_path / "train-000000.tar")) as sink:
        for i in range(64):
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(buf, format="PNG")
            sink.write({"__key__": f"{i:06d}", "png": buf.getvalue(), "cls": str(i % 2).encode()})
    cfg = Config()
    cfg.model.kwargs = yaml.safe_load(TINY_BIFORMER)
    cfg.data.source, cfg.data.img_size, cfg.data.num_workers = "wds", 16, 0
    cfg.data.wds_train = str(tmp_path / "train-000000.tar")
    cfg.data.wds_train_samples, cfg.data.wds_num_classes = 64, 2
    cfg.loop.batch_size, cfg.loop.threads = 16, 1
    cfg.schedule.epochs = 1
    cfg.log.out, cfg.log.plot = str(tmp_path / "run"), False
    with pytest.warns(UserWarning, match="WebDataset resume"):
        metrics = train(cfg)
    assert metrics["epoch"] == 1 and 0 <= metrics["val_acc1"] <= 100
