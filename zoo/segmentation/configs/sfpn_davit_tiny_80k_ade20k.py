# DaViT-T Semantic FPN 80k on ADE20K, mmseg 1.x.
# Reported ADE20K numbers: none recorded (no verified source at hand); not measured by zoo.
# Recipe: the Swin-T setting, which DaViT follows (drop path is our choice: no published DaViT
# segmentation recipe).
# Schedule, data and optimizer: see the base files (4 images/GPU x 8 GPUs, AdamW 2e-4, cosine, fp16, 512x512 crops).
#   zoo seg train zoo/segmentation/configs/sfpn_davit_tiny_80k_ade20k.py
#   torchrun --nproc_per_node 8 -m zoo.cli seg train <this file> --launcher pytorch
_base_ = ["./_base_sfpn_80k_ade20k.py"]

model = dict(
    backbone=dict(
        model_name="davit_tiny",
        drop_path_rate=0.1,
        pretrained="msft_in1k",
    ),
    neck=dict(in_channels=[96, 192, 384, 768]),
)
