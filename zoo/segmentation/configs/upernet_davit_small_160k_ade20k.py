# DaViT-S UperNet 160k on ADE20K, mmseg 1.x.
# Reported ADE20K numbers: none recorded (no verified source at hand); not measured by zoo.
# Recipe: the Swin-S setting, which DaViT follows (drop path is our choice: no published DaViT
# segmentation recipe).
# Schedule, data and optimizer: see the base files (2 images/GPU x 8 GPUs, AdamW 6e-5, poly, fp16, 512x512 crops).
#   zoo seg train zoo/segmentation/configs/upernet_davit_small_160k_ade20k.py
#   torchrun --nproc_per_node 8 -m zoo.cli seg train <this file> --launcher pytorch
_base_ = ["./_base_upernet_160k_ade20k.py"]

model = dict(
    backbone=dict(
        model_name="davit_small",
        drop_path_rate=0.3,
        pretrained="msft_in1k",
    ),
    decode_head=dict(in_channels=[96, 192, 384, 768]),
    auxiliary_head=dict(in_channels=384),
)
