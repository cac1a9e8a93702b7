"""mmdet 3.x adapter: ZooBackbone in Mask R-CNN / RetinaNet configs, the mmcv-lite compatibility layer, errors.

Runs on the mmcv-lite path (``zoo.mm.compat``) unless a compiled mmcv is installed. The tiny detection
set is two scikit-image photos: coins (Otsu threshold + connected regions, class 0) and the astronaut (largest
regions of its Otsu mask, class 1); boxes and masks come from those regions. Backbones are shrunk (fewer, narrower
blocks) through the configs' model kwargs, the heads narrowed, so a CPU step takes about a second.
"""

from __future__ import annotations

import argparse
import glob
import importlib.util
import math
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

if importlib.util.find_spec("mmdet") is None or importlib.util.find_spec("mmcv") is None:
    pytest.skip("needs the [mm-lite] extra: pip install 'attention-zoo[mm-lite]'", allow_module_level=True)
skimage = pytest.importorskip("skimage")

from skimage import data, filters, measure, morphology, segmentation, transform  # noqa: E402

from zoo.mm import compat as mmcv_compat  # noqa: E402

MODE = mmcv_compat.install()  # 'lite' on mmcv-lite (CI), 'compiled' with a compiled mmcv

import mmcv  # noqa: E402
import mmcv.ops  # noqa: E402
import torchvision  # noqa: E402
from mmdet.structures import DetDataSample  # noqa: E402
from mmdet.structures.mask import BitmapMasks  # noqa: E402
from mmdet.utils import register_all_modules  # noqa: E402
from mmengine.config import Config, ConfigDict  # noqa: E402
from mmengine.registry import DefaultScope  # noqa: E402
from mmengine.structures import InstanceData  # noqa: E402

import zoo.detection.mmdet as zoo_mmdet  # noqa: E402
from zoo.mm.backbone import ZooBackbone, layer_decay_custom_keys  # noqa: E402

register_all_modules()
from mmdet.registry import MODELS  # noqa: E402

CONFIGS = sorted(glob.glob(str(zoo_mmdet.CONFIG_DIR / "[!_]*.py")))
SIZE = 128
lite_only = pytest.mark.skipif(MODE != "lite", reason="a compiled mmcv is installed: the compatibility layer is off")

# Tiny backbones: the config's family, 1 block per stage, narrow (BiFormer heads are 32 wide: 1, 2, 3, 4 heads).
TINY_BIFORMER = dict(model_name="biformer_tiny", depths=(1, 1, 1, 1), embed_dims=(32, 64, 96, 128), pretrained=None)
TINY_DAVIT = dict(
    model_name="davit_tiny", depths=(1, 1, 1, 1), embed_dims=(32, 64, 96, 128), num_heads=(1, 2, 3, 4), pretrained=None
)


@pytest.fixture(autouse=True)
def _mmdet_scope():
    """mmdet and mmseg each set a global default registry scope; build every model of this file in mmdet's."""
    with DefaultScope.overwrite_default_scope("mmdet"):
        yield


# ----------------------------------------------------------------------------------------------------------------
# data


def _regions(gray: np.ndarray, label: int, max_regions: int, min_area: int) -> tuple[np.ndarray, np.ndarray]:
    """Boxes (N, 4) xyxy float32 and masks (N, H, W) uint8 of the largest bright regions of a [0, 1] image."""
    mask = gray > filters.threshold_otsu(gray)
    mask = segmentation.clear_border(morphology.opening(mask, morphology.disk(1)))
    props = sorted(measure.regionprops(measure.label(mask)), key=lambda r: -r.area)
    props = [r for r in props if r.area >= min_area][:max_regions]
    assert props, "no region found"
    boxes = np.array([[r.bbox[1], r.bbox[0], r.bbox[3], r.bbox[2]] for r in props], dtype=np.float32)
    masks = np.zeros((len(props), *gray.shape), dtype=np.uint8)
    for i, r in enumerate(props):
        masks[i, r.coords[:, 0], r.coords[:, 1]] = 1
    return boxes, masks


@pytest.fixture(scope="module")
def det_batch() -> dict:
    """mmdet's data-preprocessor input: ``inputs`` (3, H, W) uint8 BGR tensors and ``DetDataSample`` targets."""
    coins = transform.resize(data.coins(), (96, SIZE), anti_aliasing=True)
    astro = transform.resize(data.astronaut(), (SIZE, SIZE), anti_aliasing=True)
    images = [np.repeat(coins[..., None], 3, -1), astro]
    targets = [_regions(coins, 0, 8, 20), _regions(astro.mean(-1), 1, 3, 40)]
    inputs, samples = [], []
    for img, (boxes, masks), label in zip(images, targets, (0, 1)):
        h, w = img.shape[:2]
        inputs.append(torch.from_numpy((img[..., ::-1] * 255).round().astype(np.uint8).transpose(2, 0, 1).copy()))
        sample = DetDataSample(
            metainfo=dict(img_shape=(h, w), ori_shape=(h, w), scale_factor=(1.0, 1.0), img_id=label, flip=False)
        )
        sample.gt_instances = InstanceData(
            bboxes=torch.from_numpy(boxes),
            labels=torch.full((len(boxes),), label, dtype=torch.long),
            masks=BitmapMasks(masks, h, w),
        )
        samples.append(sample)
    return dict(inputs=inputs, data_samples=samples)


def _shrink_heads(cfg: Config, width: int = 32) -> None:
    """Narrow FPN / heads and small sampling budgets (the structure stays the config's)."""
    m = cfg.model
    m.neck.out_channels = width
    if m.type == "MaskRCNN":
        m.rpn_head.update(in_channels=width, feat_channels=width)
        roi = m.roi_head
        roi.bbox_roi_extractor.out_channels = roi.mask_roi_extractor.out_channels = width
        roi.bbox_head.update(in_channels=width, fc_out_channels=64, num_classes=2)
        roi.mask_head.update(in_channels=width, conv_out_channels=width, num_convs=2, num_classes=2)
        m.train_cfg.rpn_proposal.update(nms_pre=200, max_per_img=100)
        m.train_cfg.rcnn.sampler.num = 64
        m.test_cfg.rpn.update(nms_pre=100, max_per_img=50)
        m.test_cfg.rcnn.max_per_img = 20
    else:
        m.bbox_head.update(in_channels=width, feat_channels=width, stacked_convs=2, num_classes=2)
        m.test_cfg.update(nms_pre=100, max_per_img=20)


def _config(name: str, backbone: dict) -> Config:
    cfg = Config.fromfile(str(zoo_mmdet.CONFIG_DIR / name))
    keep = {k: v for k, v in cfg.model.backbone.items() if k in ("type", "out_norm", "norm_eval", "n_win", "pad_mode")}
    if not backbone["model_name"].startswith("biformer"):
        keep = {k: v for k, v in keep.items() if k not in ("n_win", "pad_mode")}
    cfg.model.backbone = ConfigDict(keep, **backbone)
    cfg.model.neck.in_channels = list(backbone["embed_dims"])
    _shrink_heads(cfg)
    return cfg


# ----------------------------------------------------------------------------------------------------------------
# train + predict


CASES = [
    (
        "maskrcnn_biformer_small_1x_coco.py",
        TINY_BIFORMER,
        {"loss_rpn_cls", "loss_rpn_bbox", "loss_cls", "loss_bbox", "loss_mask"},
    ),
    ("retinanet_davit_tiny_1x_coco.py", TINY_DAVIT, {"loss_cls", "loss_bbox"}),
]


@pytest.mark.parametrize("name,backbone,loss_keys", CASES, ids=[c[0].split("_")[0] for c in CASES])
def test_train_steps_and_predict(det_batch: dict, name: str, backbone: dict, loss_keys: set[str]) -> None:
    cfg = _config(name, backbone)
    model = MODELS.build(cfg.model)
    model.init_weights()
    assert isinstance(model.backbone, ZooBackbone)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    totals = []
    for step in range(3):
        batch = model.data_preprocessor(det_batch, training=True)
        losses = model(**batch, mode="loss")
        if step == 0:
            assert {k for k in losses if not k.startswith("acc")} >= loss_keys, sorted(losses)
        loss, _ = model.parse_losses(losses)
        assert math.isfinite(loss.item()), losses
        opt.zero_grad()
        loss.backward()
        opt.step()
        totals.append(loss.item())
    assert min(totals[1:]) < totals[0], totals

    model.eval()
    with torch.no_grad():
        batch = model.data_preprocessor(det_batch, training=False)
        preds = model(**batch, mode="predict")
    assert len(preds) == 2
    for pred, img in zip(preds, det_batch["inputs"]):
        inst = pred.pred_instances
        n = len(inst)
        assert inst.bboxes.shape == (n, 4) and inst.scores.shape == (n,) and inst.labels.shape == (n,)
        assert n <= 20
        if n:
            assert inst.labels.min() >= 0 and inst.labels.max() < 2
            assert (inst.bboxes[:, 2:] >= inst.bboxes[:, :2]).all()
            assert inst.bboxes[:, 2].max() <= img.shape[2] + 1e-3 and inst.bboxes[:, 3].max() <= img.shape[1] + 1e-3
        if "maskrcnn" in name:
            assert tuple(inst.masks.shape) == (n, *img.shape[1:])


@pytest.mark.parametrize("path", CONFIGS, ids=[Path(p).stem for p in CONFIGS])
def test_config_parses_and_builds(path: str) -> None:
    """Every config builds with its real backbone on the meta device (no memory, no weights) and a matching neck."""
    cfg = Config.fromfile(path)
    bb = cfg.model.backbone
    assert bb.type == "ZooBackbone" and cfg.custom_imports.imports == ["zoo.detection.mmdet"]
    assert cfg.train_cfg.max_epochs == 12 and cfg.param_scheduler[1].milestones == [8, 11]  # 1x
    if bb.model_name.startswith("biformer"):
        assert bb.n_win == 16 and bb.pad_mode == "original" and bb.out_norm  # the official COCO setting
    bb.update(device="meta", pretrained=None)
    model = MODELS.build(cfg.model)
    assert model.backbone.out_channels == list(cfg.model.neck.in_channels)
    assert model.backbone.strides == [4, 8, 16, 32]
    assert type(model).__name__ == ("MaskRCNN" if Path(path).name.startswith("maskrcnn") else "RetinaNet")


# ----------------------------------------------------------------------------------------------------------------
# the mmcv-lite compatibility layer


@lite_only
def test_compat_layer_state() -> None:
    assert mmcv_compat.is_installed() and not mmcv_compat.compiled_mmcv_available()
    assert mmcv_compat.install() == "lite"  # idempotent
    if mmcv_compat._uses_upstream_mm():
        assert mmcv.__version__ == "2.1.0"  # upstream mmdet asserts mmcv < 2.2.0 (the onedl-* fork does not)
    ext = sys.modules["mmcv._ext"]
    with pytest.raises(AttributeError):
        ext.__file__  # noqa: B018  (dunders stay missing, or inspect.getmodule breaks)
    import inspect

    from mmengine.model.utils import revert_sync_batchnorm
    from mmengine.utils.dl_utils import mmcv_full_available

    # mmengine's optimizer constructor and revert_sync_batchnorm probe mmcv._ext: upstream mmengine 0.10 with
    # pkgutil.find_loader (the stand-in's spec has no loader: False), onedl-mmengine with importlib.util.find_spec
    # (True: harmless, they then only import mmcv.ops classes for isinstance checks, which the stand-in allows)
    if "find_loader" in inspect.getsource(mmcv_full_available):
        assert not mmcv_full_available()
    else:
        mmcv_full_available()
    assert type(revert_sync_batchnorm(torch.nn.SyncBatchNorm(4))).__name__ == "_BatchNormXd"
    with pytest.raises(NotImplementedError, match=r"'deform_conv_forward'.*make mmcv"):
        ext.deform_conv_forward(torch.zeros(1))
    with pytest.raises(NotImplementedError, match="offset=0 only"):
        ext.nms(torch.zeros(1, 4), torch.zeros(1), iou_threshold=0.5, offset=1)


@lite_only
def test_nms_matches_torchvision() -> None:
    g = torch.Generator().manual_seed(0)
    xy = torch.rand(300, 2, generator=g) * 100
    boxes = torch.cat([xy, xy + 5 + torch.rand(300, 2, generator=g) * 40], 1)
    scores = torch.rand(300, generator=g)
    dets, keep = mmcv.ops.nms(boxes, scores, 0.5)
    ref = torchvision.ops.nms(boxes, scores, 0.5)
    assert 0 < len(keep) < 300 and torch.equal(keep, ref)
    assert torch.equal(dets[:, 4], scores[ref]) and torch.equal(dets[:, :4], boxes[ref])
    # batched_nms (mmdet's class-aware path) through the same op
    labels = torch.randint(0, 3, (300,), generator=g)
    _, kept = mmcv.ops.batched_nms(boxes, scores, labels, dict(type="nms", iou_threshold=0.5))
    assert torch.equal(kept, torchvision.ops.batched_nms(boxes, scores, labels, 0.5))


@lite_only
@pytest.mark.parametrize("aligned", [True, False])
@pytest.mark.parametrize("sampling_ratio", [0, 2])
def test_roi_align_bit_identical_to_torchvision(aligned: bool, sampling_ratio: int) -> None:
    g = torch.Generator().manual_seed(1)
    feats = torch.randn(2, 8, 24, 32, generator=g)
    xy = torch.rand(20, 2, generator=g) * 80
    rois = torch.cat(
        [torch.randint(0, 2, (20, 1), generator=g).float(), xy, xy + 4 + torch.rand(20, 2, generator=g) * 40], 1
    )
    grad = torch.randn(20, 8, 7, 7, generator=g)
    x1 = feats.clone().requires_grad_(True)
    out = mmcv.ops.roi_align(x1, rois, (7, 7), 0.25, sampling_ratio, "avg", aligned)
    out.backward(grad)
    x2 = feats.clone().requires_grad_(True)
    ref = torchvision.ops.roi_align(x2, rois, (7, 7), 0.25, sampling_ratio, aligned)
    ref.backward(grad)
    assert torch.equal(out, ref) and out.abs().sum() > 0
    assert torch.equal(x1.grad, x2.grad) and x1.grad.abs().sum() > 0
    with pytest.raises(NotImplementedError, match="pool_mode='avg' only"):
        mmcv.ops.roi_align(feats, rois, (7, 7), 0.25, sampling_ratio, "max", aligned)


@lite_only
def test_sigmoid_focal_loss_matches_mmdet_python_version() -> None:
    from mmdet.models.losses.focal_loss import py_sigmoid_focal_loss

    g = torch.Generator().manual_seed(2)
    logits = torch.randn(50, 4, generator=g)
    target = torch.randint(0, 5, (50,), generator=g)  # 4 = background
    x1 = logits.clone().requires_grad_(True)
    loss = mmcv.ops.sigmoid_focal_loss(x1, target, 2.0, 0.25, None, "none")
    loss.sum().backward()
    x2 = logits.clone().requires_grad_(True)
    one_hot = torch.nn.functional.one_hot(target, 5)[:, :4].float()
    ref = py_sigmoid_focal_loss(x2, one_hot, gamma=2.0, alpha=0.25, reduction="none")
    ref.sum().backward()
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-5, atol=1e-6)


def test_require_mm_errors_name_the_fix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # a framework whose __init__ refuses the mmcv version (mmdet / mmseg on mmcv-lite without the layer)
    pkg = tmp_path / "zoo_fake_mmframework"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("assert False, 'MMCV==2.2.0 is used but incompatible.'\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(mmcv_compat.MMCVIncompatibleError, match="ZOO_MMCV_COMPAT=1.*make mmcv"):
        mmcv_compat.require_mm("zoo_fake_mmframework")
    monkeypatch.setitem(sys.modules, "mmengine", None)  # mm packages absent
    with pytest.raises(ImportError, match=r"pip install 'attention-zoo\[mm-lite\]'"):
        mmcv_compat.require_mm("mmdet")


def test_trust_local_checkpoints(tmp_path: Path) -> None:
    """A checkpoint with numpy meta (what mmengine's Runner writes) loads through mmengine's loader."""
    import mmengine
    from mmengine.runner.checkpoint import _load_checkpoint

    path = tmp_path / "epoch_1.pth"
    torch.save(dict(state_dict={"w": torch.ones(2)}, meta=dict(seed=np.int64(3), hist=np.float64(0.5))), path)
    registered = mmcv_compat.trust_local_checkpoints()
    assert registered == (tuple(int(p) for p in mmengine.__version__.split(".")[:2]) < (0, 11))
    ckpt = _load_checkpoint(str(path), map_location="cpu")
    assert ckpt["meta"]["seed"] == 3 and torch.equal(ckpt["state_dict"]["w"], torch.ones(2))


# ----------------------------------------------------------------------------------------------------------------
# ZooBackbone options and errors


def test_backbone_outputs_frozen_stages_norm_eval() -> None:
    bb = ZooBackbone("halonet26t", frozen_stages=1, norm_eval=True)
    assert bb.out_indices == (1, 2, 3, 4) and bb.strides == [4, 8, 16, 32]  # the stride-2 stem level is skipped
    assert bb.frozen_modules == ["stem_conv1", "stem_conv2", "stem_conv3", "stem_pool", "stages_0"]
    bb.train()
    assert not any(p.requires_grad for p in bb.model.stages_0.parameters())
    assert all(p.requires_grad for p in bb.model.stages_1.parameters())
    assert not bb.model.stages_0.training and bb.model.stages_1.training
    assert all(not m.training for m in bb.modules() if isinstance(m, torch.nn.BatchNorm2d))
    outs = bb(torch.rand(1, 3, 96, SIZE))
    assert [tuple(o.shape) for o in outs] == [(1, c, 96 // s, SIZE // s) for c, s in zip(bb.out_channels, bb.strides)]


def test_backbone_out_norm_pretrained_file_and_padding(tmp_path: Path) -> None:
    import zoo

    kwargs = dict(depths=(1, 1, 1, 1), embed_dims=(32, 64, 96, 128))
    src = zoo.create_model("biformer_tiny", **kwargs)
    torch.save(src.state_dict(), tmp_path / "bif.pth")
    bb = ZooBackbone("biformer_tiny", out_norm=True, pretrained=str(tmp_path / "bif.pth"), **kwargs)
    assert torch.equal(bb.model.stages_1.blocks[0].mlp.fc1.weight, src.stages[1].blocks[0].mlp.fc1.weight)
    same = ZooBackbone(
        "biformer_tiny", init_cfg=dict(type="Pretrained", checkpoint=str(tmp_path / "bif.pth")), **kwargs
    )
    assert torch.equal(same.model.stem.conv1.weight, src.stem.conv1.weight)
    bb.eval()
    outs = bb(torch.rand(2, 3, 64, 96))
    for o in outs:  # LayerNorm2d over channels: zero mean, unit variance at every position
        torch.testing.assert_close(o.mean(1), torch.zeros_like(o.mean(1)), atol=1e-4, rtol=0)
    # a size constraint: a clear error, or pad_input pads and crops back to ceil(H / stride)
    strict = ZooBackbone("biformer_tiny", size_divisor=64, **kwargs)
    with pytest.raises(ValueError, match="pad_size_divisor=64"):
        strict(torch.rand(1, 3, 96, 96))
    padded = ZooBackbone("biformer_tiny", size_divisor=64, pad_input=True, **kwargs)
    outs = padded(torch.rand(1, 3, 72, 100))
    assert [tuple(o.shape[-2:]) for o in outs] == [(18, 25), (9, 13), (5, 7), (3, 4)]


def test_backbone_bad_inputs() -> None:
    with pytest.raises(ValueError, match="features_only"):
        ZooBackbone("abmil")  # a MIL head, not a backbone
    with pytest.raises(ValueError, match=r"out_indices \(1, 7\).*4 feature levels"):
        ZooBackbone("biformer_tiny", out_indices=(1, 7), depths=(1, 1, 1, 1))
    with pytest.raises(ValueError, match="frozen_stages"):
        ZooBackbone("biformer_tiny", frozen_stages=5, depths=(1, 1, 1, 1))
    fixed = ZooBackbone("halo2botnet50ts_256")  # stage-4 bottleneck attention: fixed 256x256 input
    with pytest.raises(ValueError, match="256x256"):
        fixed(torch.rand(1, 3, SIZE, SIZE))


def test_layer_decay_keys_and_optimizer() -> None:
    from mmengine.optim import build_optim_wrapper

    cfg = _config("retinanet_biformer_small_1x_coco.py", TINY_BIFORMER)
    model = MODELS.build(cfg.model)
    keys = layer_decay_custom_keys(model.backbone, 0.5)
    names = {f"backbone.model.{n}" for n, _ in model.backbone.model.named_parameters()}
    assert set(keys) == names
    stem = keys["backbone.model.stem.conv1.weight"]["lr_mult"]
    last = keys["backbone.model.stages_3.blocks.0.mlp.fc2.weight"]["lr_mult"]
    assert stem < keys["backbone.model.stages_1.blocks.0.mlp.fc1.weight"]["lr_mult"] < last <= 0.5
    assert keys["backbone.model.stages_0.blocks.0.norm1.weight"]["decay_mult"] == 0.0
    wrapper = build_optim_wrapper(
        model,
        dict(
            constructor="ZooLayerDecayOptimWrapperConstructor",
            optimizer=dict(type="AdamW", lr=1e-3, weight_decay=0.05),
            paramwise_cfg=dict(layer_decay=0.5),
        ),
    )
    lrs = {g["lr"] for g in wrapper.optimizer.param_groups}
    assert min(lrs) == pytest.approx(1e-3 * stem) and max(lrs) == pytest.approx(1e-3)


def test_cli_prepare_config(tmp_path: Path) -> None:
    from zoo.mm.cli import add_cli, prepare_config

    parser = argparse.ArgumentParser()
    add_cli(parser.add_subparsers(dest="command"))
    config = str(zoo_mmdet.CONFIG_DIR / "maskrcnn_davit_tiny_1x_coco.py")
    args = parser.parse_args(
        ["det", "train", config, "--work-dir", str(tmp_path), "--cfg-options", "train_dataloader.batch_size=4",
         "model.backbone.drop_path_rate=0.1", "--resume"]
    )  # fmt: skip
    assert args.task == "det" and args.func.__name__ == "_cmd_train"
    cfg = prepare_config("det", args)
    assert cfg.work_dir == str(tmp_path) and cfg.train_dataloader.batch_size == 4
    assert cfg.model.backbone.drop_path_rate == 0.1 and cfg.resume is True and cfg.load_from is None
    assert cfg.launcher == "none"
    if not torch.cuda.is_available():
        assert cfg.optim_wrapper.type == "OptimWrapper" and "loss_scale" not in cfg.optim_wrapper
    with pytest.raises(FileNotFoundError, match="zoo/detection/configs"):
        prepare_config("det", parser.parse_args(["det", "train", "nope.py"]))
    seg = parser.parse_args(["seg", "train", "x.py", "--launcher", "pytorch"])
    assert seg.task == "seg" and seg.launcher == "pytorch"


def test_adapter_module_contract() -> None:
    assert "ZooBackbone" in MODELS.module_dict and MODELS.get("ZooBackbone") is ZooBackbone
    assert len(CONFIGS) == 10
    assert isinstance(zoo_mmdet, types.ModuleType)
