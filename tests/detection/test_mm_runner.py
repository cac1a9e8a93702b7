"""``zoo det train`` / ``zoo seg train`` end to end: mmengine's Runner on a shipped config and an on-disk dataset.

The datasets are written at test time in the layouts the configs expect, from scikit-image photos labelled by
their own content (as ``test_mmdet.py`` / ``test_mmseg.py``):

* COCO (``annotations/instances_{train,val}2017.json``, ``{train,val}2017/``): crops of the coins photo (Otsu
  regions -> class ``coin``) and of the astronaut / cat photos (their largest Otsu regions -> class ``thing``);
  boxes and polygon masks come from the regions.
* ADE20K (``images/{training,validation}/*.jpg``, ``annotations/.../*.png``): the same photos, each pixel labelled
  by its multi-Otsu intensity band (label values 1..3; 0 on a border strip, ignored by ``reduce_zero_label``).

The configs run unchanged except for ``--cfg-options``: a tiny DaViT backbone (1 block per stage, no pretrained
weights), narrow heads, small images, 4 iterations, evaluation at the end on the same images (CocoMetric / IoUMetric),
a checkpoint, and, for detection, ``--resume`` for 2 more iterations (mmengine 0.10 checkpoints on torch >= 2.6).
"""

from __future__ import annotations

import importlib.util
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest

if any(importlib.util.find_spec(p) is None for p in ("mmcv", "mmengine", "mmdet", "mmseg", "pycocotools")):
    pytest.skip("needs the [mm-lite] extra: pip install 'attention-zoo[mm-lite]'", allow_module_level=True)
skimage = pytest.importorskip("skimage")
cv2 = pytest.importorskip("cv2")

from skimage import data, filters, measure, morphology, segmentation, transform  # noqa: E402

import zoo  # noqa: E402
from zoo.cli import main  # noqa: E402

# (not zoo.detection.mmdet.CONFIG_DIR: importing the adapter imports mmdet, which the CLI's --mmcv-lite must precede)
DET_CONFIGS = Path(zoo.__file__).parent / "detection" / "configs"
SEG_CONFIGS = Path(zoo.__file__).parent / "segmentation" / "configs"
H, W = 128, 192
# DaViT-T's family, 1 block per stage, narrow: a CPU iteration takes well under a second at 128x192
TINY_DAVIT = [
    "model.backbone.depths=(1,1,1,1)",
    "model.backbone.embed_dims=(32,64,96,128)",
    "model.backbone.num_heads=(1,2,3,4)",
    "model.backbone.drop_path_rate=0.0",
    "model.backbone.pretrained=None",
]
CHANNELS = "[32,64,96,128]"


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy 2-core machine two OpenMP threads wait for each
    other's time slices: a training iteration measured 8.4 s with 2 threads against 0.3 s with 1."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _photos() -> list[tuple[str, np.ndarray]]:
    """Four (H, W, 3) float RGB images in [0, 1]: two coins crops, the astronaut and the cat (all 2:3, resized)."""
    coins = data.coins()
    crops = {
        "coins_a": coins[0:200, 0:300],
        "coins_b": coins[100:300, 84:384],
        "astronaut": data.astronaut()[85:427],
        "chelsea": data.chelsea(),
    }
    out = []
    for name, img in crops.items():
        img = transform.resize(img, (H, W), anti_aliasing=True)
        out.append((name, np.repeat(img[..., None], 3, -1) if img.ndim == 2 else img))
    return out


def _write_image(path: Path, rgb: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), (rgb[..., ::-1] * 255).round().astype(np.uint8))


def _regions(gray: np.ndarray, max_regions: int, min_area: int) -> list:
    """The largest bright (Otsu) regions not touching the border, as skimage ``regionprops`` (as test_mmdet)."""
    mask = gray > filters.threshold_otsu(gray)
    mask = segmentation.clear_border(morphology.opening(mask, morphology.disk(1)))
    props = sorted(measure.regionprops(measure.label(mask)), key=lambda r: -r.area)
    props = [r for r in props if r.area >= min_area][:max_regions]
    assert props, "no region found"
    return props


def _polygon(region) -> list[float]:
    """COCO polygon ``[x1, y1, x2, y2, ...]`` (pixel corners) of a region's outer contour."""
    r0, c0, r1, c1 = region.bbox
    local = np.pad(region.image, 1).astype(float)
    contour = max(measure.find_contours(local, 0.5), key=len)
    contour = measure.approximate_polygon(contour, tolerance=0.5)[:-1]  # closed: drop the repeated point
    assert len(contour) >= 3
    xy = np.stack([contour[:, 1] + c0 - 0.5, contour[:, 0] + r0 - 0.5], 1).clip(0, [W, H])
    x, y = xy.T
    area = 0.5 * abs(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1)))  # shoelace
    assert abs(area - region.area) <= 0.2 * region.area, (area, region.area)
    return [round(float(v), 2) for v in xy.ravel()]


@pytest.fixture(scope="module")
def coco_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A COCO-layout dataset of four 128x192 images, two classes, boxes and polygon masks (train = val)."""
    root = tmp_path_factory.mktemp("coco")
    categories = [dict(id=1, name="coin"), dict(id=2, name="thing")]
    images, annotations = [], []
    for img_id, (name, rgb) in enumerate(_photos(), start=1):
        coins = name.startswith("coins")
        for split in ("train2017", "val2017"):
            _write_image(root / split / f"{name}.jpg", rgb)
        images.append(dict(id=img_id, file_name=f"{name}.jpg", height=H, width=W))
        for region in _regions(rgb.mean(-1), 6 if coins else 2, 40):
            r0, c0, r1, c1 = region.bbox
            annotations.append(
                dict(
                    id=len(annotations) + 1,
                    image_id=img_id,
                    category_id=1 if coins else 2,
                    bbox=[float(c0), float(r0), float(c1 - c0), float(r1 - r0)],
                    area=float(region.area),
                    segmentation=[_polygon(region)],
                    iscrowd=0,
                )
            )
    (root / "annotations").mkdir()
    for split in ("train2017", "val2017"):
        ann = dict(images=images, annotations=annotations, categories=categories)
        (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(ann))
    assert len(annotations) >= 8
    return root


@pytest.fixture(scope="module")
def ade_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An ADE20K-layout dataset of four 128x192 images; labels 1..3 (intensity bands), 0 (ignored) on a strip."""
    root = tmp_path_factory.mktemp("ade")
    for name, rgb in _photos():
        gray = rgb.mean(-1)
        label = (np.digitize(gray, filters.threshold_multiotsu(gray, classes=3)) + 1).astype(np.uint8)
        label[:, :8] = 0
        assert set(np.unique(label)) == {0, 1, 2, 3}
        for split in ("training", "validation"):
            _write_image(root / "images" / split / f"{name}.jpg", rgb)
            (root / "annotations" / split).mkdir(parents=True, exist_ok=True)
            assert cv2.imwrite(str(root / "annotations" / split / f"{name}.png"), label)
    return root


def _old_mmengine_on_new_torch() -> bool:
    import mmengine
    import torch

    def version(v: str) -> tuple[int, ...]:
        return tuple(int(p) for p in re.findall(r"\d+", v)[:2])

    return version(mmengine.__version__) < (0, 11) and version(torch.__version__) >= (2, 6)


def _runs(work_dir: Path) -> list[Path]:
    """The Runner's per-run folders (``<work_dir>/<timestamp>``), oldest first."""
    return sorted(p for p in work_dir.iterdir() if p.is_dir() and re.fullmatch(r"\d{8}_\d{6}", p.name))


def _scalars(run: Path) -> list[dict]:
    """The LocalVisBackend's scalar records of one run (training logs and validation metrics)."""
    return [json.loads(line) for line in (run / "vis_data" / "scalars.json").read_text().splitlines() if line]


def _text_log(run: Path) -> str:
    return (run / f"{run.name}.log").read_text()


def _iter_based(iters: int, val_interval: int) -> list[str]:
    """Replace the config's train loop by an iteration-based one; log, checkpoint and validate by iteration."""
    return [
        "train_cfg._delete_=True",
        "train_cfg.type=IterBasedTrainLoop",
        f"train_cfg.max_iters={iters}",
        f"train_cfg.val_interval={val_interval}",
        "log_processor.by_epoch=False",
        "default_hooks.logger.interval=1",
        "default_hooks.logger.log_metric_by_epoch=False",  # validation metrics at step = iteration
        "default_hooks.checkpoint.by_epoch=False",
        f"default_hooks.checkpoint.interval={val_interval}",
    ]


def _run(argv: list[str], options: list[str]) -> None:
    assert main([*argv, "--cfg-options", *options]) == 0


def _loader(which: str, batch: int) -> list[str]:
    return [
        f"{which}_dataloader.batch_size={batch}",
        f"{which}_dataloader.num_workers=0",
        f"{which}_dataloader.persistent_workers=False",
    ]


def _check_training(run: Path, first_iter: int, last_iter: int) -> list[dict]:
    records = _scalars(run)
    train = [r for r in records if "loss" in r]
    assert [r["iter"] for r in train] == list(range(first_iter, last_iter + 1)), train
    assert all(math.isfinite(r["loss"]) for r in train), train
    return records


def test_det_train_eval_checkpoint_resume(coco_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Mask R-CNN (DaViT-T config): 4 iterations, CocoMetric bbox + segm, iter_4.pth, then --resume to iter 6."""
    work = tmp_path / "work"
    config = str(DET_CONFIGS / "maskrcnn_davit_tiny_1x_coco.py")
    classes = "metainfo.classes=(coin,thing)"
    options = [
        *TINY_DAVIT,
        f"model.neck.in_channels={CHANNELS}",
        "model.neck.out_channels=32",
        "model.rpn_head.in_channels=32",
        "model.rpn_head.feat_channels=32",
        "model.roi_head.bbox_roi_extractor.out_channels=32",
        "model.roi_head.mask_roi_extractor.out_channels=32",
        "model.roi_head.bbox_head.in_channels=32",
        "model.roi_head.bbox_head.fc_out_channels=64",
        "model.roi_head.bbox_head.num_classes=2",
        "model.roi_head.mask_head.in_channels=32",
        "model.roi_head.mask_head.conv_out_channels=32",
        "model.roi_head.mask_head.num_convs=2",
        "model.roi_head.mask_head.num_classes=2",
        "model.train_cfg.rpn_proposal.nms_pre=200",
        "model.train_cfg.rpn_proposal.max_per_img=100",
        "model.train_cfg.rcnn.sampler.num=64",
        "model.test_cfg.rpn.nms_pre=100",
        "model.test_cfg.rpn.max_per_img=50",
        "model.test_cfg.rcnn.max_per_img=20",
        "model.test_cfg.rcnn.score_thr=0.0",  # an untrained model still detects something: CocoMetric reports
        *_loader("train", 2),
        *_loader("val", 2),
        f"train_dataloader.dataset.data_root={coco_root}",
        f"val_dataloader.dataset.data_root={coco_root}",
        f"train_dataloader.dataset.{classes}",
        f"val_dataloader.dataset.{classes}",
        "train_dataloader.dataset.pipeline.2.scale=(192,128)",  # LoadImage, LoadAnnotations, Resize, ...
        "val_dataloader.dataset.pipeline.1.scale=(192,128)",  # LoadImage, Resize, ...
        f"val_evaluator.ann_file={coco_root / 'annotations' / 'instances_val2017.json'}",
    ]
    argv = ["det", "train", config, "--work-dir", str(work), "--mmcv-lite"]
    _run(argv, [*options, *_iter_based(4, 4)])

    assert (work / "iter_4.pth").is_file() and (work / "last_checkpoint").read_text().strip().endswith("iter_4.pth")
    (run,) = _runs(work)
    records = _check_training(run, 1, 4)
    assert {"loss_rpn_cls", "loss_rpn_bbox", "loss_cls", "loss_bbox", "loss_mask"} <= set(records[0]), records[0]
    (metrics,) = [r for r in records if "coco/bbox_mAP" in r]
    assert metrics["step"] == 4
    for key in ("coco/bbox_mAP", "coco/bbox_mAP_50", "coco/segm_mAP"):
        assert isinstance(metrics[key], float) and (math.isnan(metrics[key]) or 0 <= metrics[key] <= 1), metrics

    # --resume (alone: the latest checkpoint of the work dir) continues at iteration 5 with 2 more iterations
    old_mmengine = _old_mmengine_on_new_torch()
    if old_mmengine:  # what mmengine 0.10 would do on torch >= 2.6 without zoo's loader (numpy objects in the meta)
        import pickle

        import torch

        with pytest.raises(pickle.UnpicklingError, match="weights_only"):
            torch.load(work / "iter_4.pth", map_location="cpu", weights_only=True)
    capsys.readouterr()
    _run([*argv, "--resume"], [*options, *_iter_based(6, 2)])
    if old_mmengine:
        assert "loading checkpoints with torch.load(weights_only=False)" in capsys.readouterr().out
    first, second = _runs(work)  # the second Runner of this process logs into its own folder
    assert first == run
    log = _text_log(second)
    assert f"Auto resumed from the latest checkpoint {work / 'iter_4.pth'}" in log
    assert "resumed epoch: 0, iter: 4" in log
    resumed = _check_training(second, 5, 6)
    assert (work / "iter_6.pth").is_file()
    # the warm-up schedule goes on where it stopped (linear in the iteration: equal steps across the two runs)
    lrs = [r["lr"] for r in records + resumed if "loss" in r]
    assert np.allclose(np.diff(lrs), lrs[1] - lrs[0], rtol=1e-3), lrs
    assert [r["step"] for r in resumed if "coco/bbox_mAP" in r] == [6]


SEG_HEADS = {
    "sfpn_davit_tiny_80k_ade20k.py": [
        f"model.neck.in_channels={CHANNELS}",
        "model.neck.out_channels=32",
        "model.decode_head.in_channels=[32,32,32,32]",
        "model.decode_head.channels=32",
        "model.decode_head.num_classes=3",
    ],
    "upernet_davit_tiny_160k_ade20k.py": [
        f"model.decode_head.in_channels={CHANNELS}",
        "model.decode_head.channels=32",
        "model.decode_head.num_classes=3",
        "model.auxiliary_head.in_channels=96",
        "model.auxiliary_head.channels=16",
        "model.auxiliary_head.num_classes=3",
    ],
}


@pytest.mark.parametrize("name", list(SEG_HEADS), ids=lambda n: n.split("_")[0])
def test_seg_train_eval_checkpoint(ade_root: Path, tmp_path: Path, name: str) -> None:
    """Semantic FPN / UperNet (DaViT-T ADE20K configs): 4 iterations, IoUMetric at the end, iter_4.pth."""
    work = tmp_path / "work"
    options = [
        *TINY_DAVIT,
        *SEG_HEADS[name],
        f"model.data_preprocessor.size=({H},{W})",
        *_loader("train", 2),
        *_loader("val", 1),
        f"train_dataloader.dataset.data_root={ade_root}",
        f"val_dataloader.dataset.data_root={ade_root}",
        # LoadImage, LoadAnnotations, RandomResize, RandomCrop, ...: resize around and crop to the images' size
        f"train_dataloader.dataset.pipeline.2.scale=({W},{H})",
        f"train_dataloader.dataset.pipeline.3.crop_size=({H},{W})",
        f"val_dataloader.dataset.pipeline.1.scale=({W},{H})",  # LoadImage, Resize, ...
        "train_cfg.max_iters=4",
        "train_cfg.val_interval=4",
        "default_hooks.logger.interval=1",
        "default_hooks.checkpoint.interval=4",
    ]
    argv = ["seg", "train", str(SEG_CONFIGS / name), "--work-dir", str(work), "--mmcv-lite"]
    _run(argv, options)

    assert (work / "iter_4.pth").is_file()
    (run,) = _runs(work)
    records = _check_training(run, 1, 4)
    losses = {"decode.loss_ce"} | ({"aux.loss_ce"} if name.startswith("upernet") else set())
    assert losses <= set(records[0]), records[0]
    (metrics,) = [r for r in records if "mIoU" in r]
    assert metrics["step"] == 4 and isinstance(metrics["mIoU"], float) and 0 <= metrics["mIoU"] <= 100, metrics
