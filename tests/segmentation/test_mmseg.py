"""mmsegmentation 1.x adapter: ZooBackbone in UperNet / Semantic FPN configs, train steps and inference.

Runs on the mmcv-lite path (``zoo.mm.compat``) unless a compiled mmcv is installed. The tiny set is two
scikit-image photos labelled from their own content: coins (Otsu foreground = class 1, background 0) and the
camera man (Otsu foreground = class 2, background 0).
"""

from __future__ import annotations

import glob
import importlib.util
import math
from pathlib import Path

import numpy as np
import pytest
import torch

if importlib.util.find_spec("mmseg") is None or importlib.util.find_spec("mmcv") is None:
    pytest.skip("needs the [mm-lite] extra: pip install 'attention-zoo[mm-lite]'", allow_module_level=True)
skimage = pytest.importorskip("skimage")

from skimage import data, filters, transform  # noqa: E402

from zoo.mm import compat as mmcv_compat  # noqa: E402

mmcv_compat.install()  # no-op with a compiled mmcv

from mmengine.config import Config, ConfigDict  # noqa: E402
from mmengine.registry import DefaultScope  # noqa: E402
from mmengine.structures import PixelData  # noqa: E402
from mmseg.structures import SegDataSample  # noqa: E402
from mmseg.utils import register_all_modules  # noqa: E402

import zoo.segmentation.mmseg as zoo_mmseg  # noqa: E402
from zoo.mm.backbone import ZooBackbone  # noqa: E402

register_all_modules()
from mmseg.registry import MODELS  # noqa: E402

CONFIGS = sorted(glob.glob(str(zoo_mmseg.CONFIG_DIR / "[!_]*.py")))
SIZE = 128
NUM_CLASSES = 3


@pytest.fixture(autouse=True)
def _mmseg_scope():
    """mmdet and mmseg each set a global default registry scope; build every model of this file in mmseg's."""
    with DefaultScope.overwrite_default_scope("mmseg"):
        yield


@pytest.fixture(scope="module")
def seg_batch() -> dict:
    """Data-preprocessor input: ``inputs`` (3, H, W) uint8 tensors, ``SegDataSample`` with (1, H, W) label maps."""
    inputs, samples = [], []
    for gray, label in ((data.coins(), 1), (data.camera(), 2)):
        img = transform.resize(gray, (SIZE, SIZE), anti_aliasing=True)
        seg = np.where(img > filters.threshold_otsu(img), label, 0)
        inputs.append(torch.from_numpy((np.repeat(img[None], 3, 0) * 255).round().astype(np.uint8)))
        sample = SegDataSample(metainfo=dict(img_shape=(SIZE, SIZE), ori_shape=(SIZE, SIZE), pad_shape=(SIZE, SIZE)))
        sample.gt_sem_seg = PixelData(data=torch.from_numpy(seg[None]).long())
        samples.append(sample)
    assert all(len(torch.unique(s.gt_sem_seg.data)) == 2 for s in samples)
    return dict(inputs=inputs, data_samples=samples)


def _config(name: str, backbone: dict, channels: list[int]) -> Config:
    """A config with a tiny backbone, narrow heads, 3 classes and 128x128 inputs."""
    cfg = Config.fromfile(str(zoo_mmseg.CONFIG_DIR / name))
    m = cfg.model
    keep = {k: v for k, v in m.backbone.items() if k in ("type", "out_norm", "n_win", "pad_mode")}
    if not backbone["model_name"].startswith("biformer"):
        keep = {k: v for k, v in keep.items() if k not in ("n_win", "pad_mode")}
    m.backbone = ConfigDict(keep, **backbone)
    m.data_preprocessor.size = (SIZE, SIZE)
    norm = dict(type="BN", requires_grad=True)
    if m.decode_head.type == "UPerHead":
        m.decode_head.update(in_channels=channels, channels=32, num_classes=NUM_CLASSES, norm_cfg=norm)
        m.auxiliary_head.update(in_channels=channels[2], channels=16, num_classes=NUM_CLASSES, norm_cfg=norm)
    else:
        m.neck.update(in_channels=channels, out_channels=32)
        m.decode_head.update(in_channels=[32] * 4, channels=16, num_classes=NUM_CLASSES, norm_cfg=norm)
    return cfg


CASES = [
    (
        "upernet_davit_tiny_160k_ade20k.py",
        dict(
            model_name="davit_tiny",
            depths=(1, 1, 1, 1),
            embed_dims=(32, 64, 96, 128),
            num_heads=(1, 2, 3, 4),
            pretrained=None,
        ),
        [32, 64, 96, 128],
        {"decode.loss_ce", "aux.loss_ce"},
    ),
    (
        "sfpn_biformer_small_80k_ade20k.py",
        dict(model_name="biformer_tiny", depths=(1, 1, 1, 1), embed_dims=(32, 64, 96, 128), pretrained=None),
        [32, 64, 96, 128],
        {"decode.loss_ce"},
    ),
]


@pytest.mark.parametrize("name,backbone,channels,loss_keys", CASES, ids=[c[0].split("_")[0] for c in CASES])
def test_train_steps_and_predict(seg_batch: dict, name: str, backbone: dict, channels: list[int], loss_keys) -> None:
    cfg = _config(name, backbone, channels)
    model = MODELS.build(cfg.model)
    model.init_weights()
    assert isinstance(model.backbone, ZooBackbone) and model.backbone.out_channels == channels
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    totals = []
    for step in range(3):
        batch = model.data_preprocessor(seg_batch, training=True)
        losses = model(**batch, mode="loss")
        if step == 0:
            assert {k for k in losses if "loss" in k} == loss_keys, sorted(losses)
        loss, _ = model.parse_losses(losses)
        assert math.isfinite(loss.item()), losses
        opt.zero_grad()
        loss.backward()
        opt.step()
        totals.append(loss.item())
    assert min(totals[1:]) < totals[0], totals

    model.eval()
    with torch.no_grad():
        batch = model.data_preprocessor(seg_batch, training=False)
        preds = model(**batch, mode="predict")
    assert len(preds) == 2
    for pred in preds:
        assert pred.seg_logits.data.shape == (NUM_CLASSES, SIZE, SIZE)
        labels = pred.pred_sem_seg.data
        assert labels.shape == (1, SIZE, SIZE) and labels.dtype == torch.int64
        assert labels.min() >= 0 and labels.max() < NUM_CLASSES
        assert torch.equal(labels[0], pred.seg_logits.data.argmax(0))


@pytest.mark.parametrize("path", CONFIGS, ids=[Path(p).stem for p in CONFIGS])
def test_config_parses_and_builds(path: str) -> None:
    """Every config builds with its real backbone on the meta device (no memory, no weights), channels consistent."""
    cfg = Config.fromfile(path)
    bb = cfg.model.backbone
    assert bb.type == "ZooBackbone" and cfg.custom_imports.imports == ["zoo.segmentation.mmseg"]
    upernet = Path(path).name.startswith("upernet")
    assert cfg.train_cfg.max_iters == (160000 if upernet else 80000)
    assert cfg.model.decode_head.num_classes == 150 and cfg.crop_size == (512, 512)
    if bb.model_name.startswith("biformer"):
        assert bb.n_win == 8 and bb.pad_mode == "original" and bb.out_norm  # the official ADE20K setting
    bb.update(device="meta", pretrained=None)
    model = MODELS.build(cfg.model)
    channels = model.backbone.out_channels
    if upernet:
        assert list(cfg.model.decode_head.in_channels) == channels
        assert cfg.model.auxiliary_head.in_channels == channels[2]
    else:
        assert list(cfg.model.neck.in_channels) == channels
    assert model.backbone.strides == [4, 8, 16, 32]


def test_adapter_registers_in_mmseg() -> None:
    assert MODELS.get("ZooBackbone") is ZooBackbone
    assert len(CONFIGS) == 10
