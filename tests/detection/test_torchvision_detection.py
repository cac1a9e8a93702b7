"""torchvision detectors on zoo / timm backbones: train steps on real photos, inference, options, errors.

The tiny detection set is made from scikit-image photos: coins (Otsu threshold + connected regions, class 1)
and the astronaut (the largest regions of its Otsu mask, class 2), regions touching the border dropped;
boxes and masks come from those regions.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor

import zoo
from zoo.detection.torchvision import build_backbone_fpn, build_detector

skimage = pytest.importorskip("skimage")
from skimage import data, filters, measure, morphology, segmentation, transform  # noqa: E402

SIZE = 128
# Small torchvision budgets so that a CPU step takes well under a second.
RCNN_KWARGS = dict(
    rpn_pre_nms_top_n_train=200,
    rpn_post_nms_top_n_train=100,
    rpn_pre_nms_top_n_test=100,
    rpn_post_nms_top_n_test=50,
    rpn_batch_size_per_image=64,
    box_batch_size_per_image=64,
    box_detections_per_img=20,
)
RETINA_KWARGS = dict(topk_candidates=100, detections_per_img=20)
FPN = 32  # FPN channels of the training tests


def _small_heads(detector: str, num_classes: int) -> dict[str, torch.nn.Module]:
    """Narrow R-CNN box / mask heads (torchvision's defaults: a 1024-wide MLP, four 256-channel mask convs)."""
    if detector == "retinanet":
        return {}
    heads = dict(box_head=TwoMLPHead(FPN * 7 * 7, 128), box_predictor=FastRCNNPredictor(128, num_classes))
    if detector == "maskrcnn":
        heads.update(mask_head=MaskRCNNHeads(FPN, [32, 32], 1), mask_predictor=MaskRCNNPredictor(32, 32, num_classes))
    return heads


def _regions(gray: np.ndarray, label: int, max_regions: int, min_area: int) -> dict[str, torch.Tensor]:
    """Boxes (N, 4) xyxy, labels (N,) and masks (N, H, W) of the largest bright regions of a [0, 1] image."""
    mask = gray > filters.threshold_otsu(gray)
    mask = segmentation.clear_border(morphology.opening(mask, morphology.disk(1)))
    props = sorted(measure.regionprops(measure.label(mask)), key=lambda r: -r.area)
    props = [r for r in props if r.area >= min_area][:max_regions]
    assert props, "no region found"
    boxes, masks = [], []
    for r in props:
        r0, c0, r1, c1 = r.bbox
        boxes.append([c0, r0, c1, r1])
        m = np.zeros(gray.shape, dtype=np.uint8)
        m[r.coords[:, 0], r.coords[:, 1]] = 1
        masks.append(m)
    return dict(
        boxes=torch.tensor(boxes, dtype=torch.float32),
        labels=torch.full((len(props),), label, dtype=torch.int64),
        masks=torch.from_numpy(np.stack(masks)),
    )


@pytest.fixture(scope="module")
def detection_set() -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]:
    """Two images (3, H, W) in [0, 1] (coins 96x128, astronaut 128x128) and their targets."""
    coins = transform.resize(data.coins(), (96, SIZE), anti_aliasing=True)
    astro = transform.resize(data.astronaut(), (SIZE, SIZE), anti_aliasing=True)
    images = [
        torch.from_numpy(np.repeat(coins[None], 3, 0)).float(),
        torch.from_numpy(astro.transpose(2, 0, 1).copy()).float(),
    ]
    targets = [
        _regions(coins, label=1, max_regions=8, min_area=20),
        _regions(astro.mean(-1), label=2, max_regions=3, min_area=40),
    ]
    return images, targets


CASES = [
    ("fasterrcnn", "davit_tiny", {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"}),
    ("retinanet", "resnet18", {"classification", "bbox_regression"}),
    ("maskrcnn", "halonet26t", {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg", "loss_mask"}),
]


@pytest.mark.parametrize("detector,backbone,loss_keys", CASES, ids=[f"{d}-{b}" for d, b, _ in CASES])
def test_train_steps_and_inference(detection_set, detector: str, backbone: str, loss_keys: set[str]) -> None:
    images, targets = detection_set
    if detector != "maskrcnn":
        targets = [{k: v for k, v in t.items() if k != "masks"} for t in targets]
    num_classes = 3  # background (unused by RetinaNet), coin, astronaut
    model = build_detector(
        detector,
        backbone,
        num_classes=num_classes,
        min_size=SIZE,
        max_size=SIZE,
        fpn_channels=FPN,
        detector_kwargs=dict(RETINA_KWARGS if detector == "retinanet" else RCNN_KWARGS, **_small_heads(detector, 3)),
    )
    model.train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01, momentum=0.9)
    totals = []
    for step in range(3):
        losses = model(images, targets)
        if step == 0:
            assert set(losses) == loss_keys
            assert all(v.ndim == 0 and math.isfinite(v.item()) for v in losses.values()), losses
        total = sum(losses.values())
        opt.zero_grad()
        total.backward()
        opt.step()
        totals.append(total.item())
    assert all(math.isfinite(t) for t in totals), totals
    assert min(totals[1:]) < totals[0], totals

    model.eval()
    with torch.no_grad():
        preds = model(images)
    assert len(preds) == len(images)
    for img, pred in zip(images, preds):
        keys = {"boxes", "labels", "scores"} | ({"masks"} if detector == "maskrcnn" else set())
        assert set(pred) == keys
        n = pred["boxes"].shape[0]
        assert pred["boxes"].shape == (n, 4) and pred["scores"].shape == (n,) and pred["labels"].shape == (n,)
        assert pred["labels"].dtype == torch.int64
        if n:
            assert pred["labels"].min() >= 0 and pred["labels"].max() < num_classes
            assert (pred["boxes"][:, 2:] >= pred["boxes"][:, :2]).all()
            assert pred["boxes"][:, 2].max() <= img.shape[2] + 1e-3 and pred["boxes"][:, 3].max() <= img.shape[1] + 1e-3
        if detector == "maskrcnn":
            assert pred["masks"].shape == (n, 1, *img.shape[1:])


@pytest.mark.parametrize(
    "detector,backbone,strides,anchors",
    [
        ("fasterrcnn", "halonet26t", [4, 8, 16, 32, 64], (32, 64, 128, 256, 512)),  # stride-2 stem level dropped
        ("retinanet", "resnet18", [8, 16, 32, 64, 128], (32, 64, 128, 256, 512)),  # C3-C5 + P6, P7
    ],
)
def test_levels_and_anchors(detector: str, backbone: str, strides: list[int], anchors: tuple[int, ...]) -> None:
    fpn, got = build_backbone_fpn(backbone, detector, out_channels=32)
    assert got == strides
    out = fpn(torch.rand(1, 3, SIZE, SIZE))
    assert [v.shape[-1] for v in out.values()] == [SIZE // s for s in strides]
    assert all(v.shape[1] == 32 for v in out.values())
    model = build_detector(detector, backbone, num_classes=3, min_size=SIZE, max_size=SIZE, fpn_channels=32)
    gen = model.rpn.anchor_generator if detector != "retinanet" else model.anchor_generator
    assert tuple(s[0] for s in gen.sizes) == anchors
    assert all(tuple(r) == (0.5, 1.0, 2.0) for r in gen.aspect_ratios)


def test_out_indices_explicit() -> None:
    fpn, strides = build_backbone_fpn("halonet26t", "fasterrcnn", out_indices=(2, 3, 4), out_channels=16)
    assert strides == [8, 16, 32, 64]
    assert [b[0].in_channels for b in fpn.fpn.inner_blocks] == [512, 1024, 2048]
    out = fpn(torch.rand(1, 3, 96, SIZE))
    assert [tuple(v.shape[-2:]) for v in out.values()] == [(12, 16), (6, 8), (3, 4), (2, 2)]


def test_frozen_stages_and_norm_eval() -> None:
    model = build_detector("fasterrcnn", "resnet18", num_classes=3, frozen_stages=2, norm_eval=True, fpn_channels=16)
    body = model.backbone.body
    grads = {name: any(p.requires_grad for p in m.parameters()) for name, m in body.named_children()}
    frozen = {name for name, trainable in grads.items() if not trainable}
    assert frozen == {"conv1", "bn1", "act1", "maxpool", "layer1", "layer2"}
    assert grads["layer3"] and grads["layer4"]
    model.train()
    assert model.training and body.layer3.training
    assert not body.layer1.training  # frozen stages stay in eval mode
    assert all(not m.training for m in body.modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert all(p.requires_grad for p in model.backbone.fpn.parameters())
    # torchvision-style count of trainable units, same freezing
    same = build_detector("fasterrcnn", "resnet18", num_classes=3, trainable_layers=2, fpn_channels=16)
    assert [n for n, p in same.backbone.body.named_parameters() if not p.requires_grad] == [
        n for n, p in body.named_parameters() if not p.requires_grad
    ]
    # a zoo backbone: the stem (everything before stage 1) and stage 1
    fpn, _ = build_backbone_fpn("halonet26t", frozen_stages=1, out_channels=16)
    assert fpn.frozen_modules == ["stem_conv1", "stem_conv2", "stem_conv3", "stem_pool", "stages_0"]
    fpn, _ = build_backbone_fpn("halonet26t", frozen_stages=-1, out_channels=16)
    assert not any(p.requires_grad for p in fpn.body.parameters())


def test_pretrained_backbone_from_file(tmp_path) -> None:
    src = zoo.create_model("halonet26t")
    path = tmp_path / "halonet26t.pth"
    torch.save(src.state_dict(), path)
    fpn, _ = build_backbone_fpn("halonet26t", pretrained_backbone=str(path), out_channels=16)
    ref = src.state_dict()
    for name, value in fpn.body.state_dict().items():  # features_only flattens 'stem.conv1' to 'stem_conv1'
        key = name if name in ref else name.replace("_", ".", 1)
        assert torch.equal(value, ref[key]), name
    with pytest.raises(Exception, match="does not exist"):
        build_backbone_fpn("halonet26t", pretrained_backbone=str(tmp_path / "missing.pth"))


def test_clear_errors() -> None:
    with pytest.raises(ValueError, match="not available.*5 feature levels"):
        build_detector("fasterrcnn", "halonet26t", num_classes=3, out_indices=(1, 7))
    with pytest.raises(ValueError, match="features_only"):
        build_detector("fasterrcnn", "abmil", num_classes=3)
    with pytest.raises(ValueError, match="unknown detector"):
        build_detector("yolo", "resnet18", num_classes=3)
    with pytest.raises(ValueError, match="frozen_stages"):
        build_detector("fasterrcnn", "resnet18", num_classes=3, frozen_stages=9)
