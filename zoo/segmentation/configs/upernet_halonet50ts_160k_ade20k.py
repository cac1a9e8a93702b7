# HaloNet-50ts UperNet 160k on ADE20K, mmseg 1.x.
# Reported ADE20K numbers: none recorded (no verified source at hand); not measured by zoo.
# Recipe: the ResNet-50 setting of the same decoder (no segmentation recipe for timm's halonet50ts is published).
# Schedule, data and optimizer: see the base files (2 images/GPU x 8 GPUs, AdamW 6e-5, poly, fp16, 512x512 crops).
#   zoo seg train zoo/segmentation/configs/upernet_halonet50ts_160k_ade20k.py
#   torchrun --nproc_per_node 8 -m zoo.cli seg train <this file> --launcher pytorch
_base_ = ["./_base_upernet_160k_ade20k.py"]

model = dict(
    backbone=dict(
        model_name="halonet50ts",
        drop_path_rate=0.0,
        out_norm=False,  # a BatchNorm convnet: no extra output norm
        pretrained="a1h_in1k",
    ),
    decode_head=dict(in_channels=[256, 512, 1024, 2048]),
    auxiliary_head=dict(in_channels=1024),
)
