# DaViT-T Mask R-CNN 1x on COCO 2017, mmdet 3.x.
# Reported COCO numbers: none recorded (no verified source at hand); not measured by zoo.
# Recipe: Swin-T's 1x setting, which DaViT follows (drop path 0.2 is our choice: no published DaViT
# detection recipe).
# Schedule, data and optimizer: see the base files (12 epochs, 2 images/GPU x 8 GPUs, fp16).
#   zoo det train zoo/detection/configs/maskrcnn_davit_tiny_1x_coco.py
#   torchrun --nproc_per_node 8 -m zoo.cli det train <this file> --launcher pytorch
_base_ = ["./_base_maskrcnn_1x_coco.py"]

model = dict(
    backbone=dict(
        model_name="davit_tiny",
        drop_path_rate=0.2,
        pretrained="msft_in1k",
    ),
    neck=dict(in_channels=[96, 192, 384, 768]),
)
