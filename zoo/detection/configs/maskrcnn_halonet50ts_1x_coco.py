# HaloNet-50ts Mask R-CNN 1x on COCO 2017, mmdet 3.x.
# Reported COCO numbers: none recorded (no verified source at hand); not measured by zoo.
# Recipe: mmdet's ResNet-50 1x (SGD): no detection recipe for timm's halonet50ts is published (its weights are
# ImageNet-only).
# Schedule, data and optimizer: see the base files (12 epochs, 2 images/GPU x 8 GPUs, fp16).
#   zoo det train zoo/detection/configs/maskrcnn_halonet50ts_1x_coco.py
#   torchrun --nproc_per_node 8 -m zoo.cli det train <this file> --launcher pytorch
_base_ = ["./_base_maskrcnn_1x_coco.py"]
model = dict(
    backbone=dict(
        model_name="halonet50ts",
        drop_path_rate=0.0,
        out_norm=False,  # a BatchNorm convnet: no extra output norm
        frozen_stages=1,  # stem + stage 1 frozen, as mmdet's ResNet-50 1x
        pretrained="a1h_in1k",
    ),
    neck=dict(in_channels=[256, 512, 1024, 2048]),
)
# mmdet's R-50 1x optimizer for a BatchNorm convnet: SGD lr 0.02, momentum 0.9, weight decay 1e-4.
optim_wrapper = dict(
    optimizer=dict(_delete_=True, type="SGD", lr=0.02, momentum=0.9, weight_decay=1e-4),
    paramwise_cfg=dict(_delete_=True),
)
