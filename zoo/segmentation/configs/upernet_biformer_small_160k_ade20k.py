# BiFormer-S UperNet 160k on ADE20K, mmseg 1.x.
# Reported on ADE20K val: mIoU 49.8 single-scale, 50.8 multi-scale + flip (paper); not re-measured by zoo.
# Recipe: the official BiFormer ADE20K configs (rayleizhu/BiFormer semantic_segmentation): n_win 8, auto_pad, a
# LayerNorm on each output.
# Schedule, data and optimizer: see the base files (2 images/GPU x 8 GPUs, AdamW 6e-5, poly, fp16, 512x512 crops).
#   zoo seg train zoo/segmentation/configs/upernet_biformer_small_160k_ade20k.py
#   torchrun --nproc_per_node 8 -m zoo.cli seg train <this file> --launcher pytorch
_base_ = ["./_base_upernet_160k_ade20k.py"]

model = dict(
    backbone=dict(
        model_name="biformer_small",
        drop_path_rate=0.3,
        n_win=8,  # 8x8 regions at 512x512 (the official ADE20K setting; 7 in classification)
        pad_mode="original",  # the official auto_pad: BRA maps zero-padded to a multiple of n_win
        pretrained="in1k",
    ),
    decode_head=dict(in_channels=[64, 128, 256, 512]),
    auxiliary_head=dict(in_channels=256),
)
