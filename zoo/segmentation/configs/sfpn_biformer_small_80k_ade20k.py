# BiFormer-S Semantic FPN 80k on ADE20K, mmseg 1.x.
# Reported on ADE20K val: mIoU 48.9 (paper); not re-measured by zoo.
# Recipe: the official BiFormer ADE20K configs (rayleizhu/BiFormer semantic_segmentation): n_win 8, auto_pad, a
# LayerNorm on each output.
# Schedule, data and optimizer: see the base files (4 images/GPU x 8 GPUs, AdamW 2e-4, cosine, fp16, 512x512 crops).
#   zoo seg train zoo/segmentation/configs/sfpn_biformer_small_80k_ade20k.py
#   torchrun --nproc_per_node 8 -m zoo.cli seg train <this file> --launcher pytorch
_base_ = ["./_base_sfpn_80k_ade20k.py"]

model = dict(
    backbone=dict(
        model_name="biformer_small",
        drop_path_rate=0.15,
        n_win=8,  # 8x8 regions at 512x512 (the official ADE20K setting; 7 in classification)
        pad_mode="original",  # the official auto_pad: BRA maps zero-padded to a multiple of n_win
        pretrained="in1k",
    ),
    neck=dict(in_channels=[64, 128, 256, 512]),
)
