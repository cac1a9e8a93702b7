# BiFormer-S RetinaNet 1x on COCO 2017, mmdet 3.x.
# Reported on COCO val2017: box AP 45.9 (paper); 47.3 (official re-run); not re-measured by zoo.
# Recipe: the official BiFormer COCO configs (rayleizhu/BiFormer): drop path 0.2, n_win 16, auto_pad, a LayerNorm on
# each output.
# Schedule, data and optimizer: see the base files (12 epochs, 2 images/GPU x 8 GPUs, fp16).
#   zoo det train zoo/detection/configs/retinanet_biformer_small_1x_coco.py
#   torchrun --nproc_per_node 8 -m zoo.cli det train <this file> --launcher pytorch
_base_ = ["./_base_retinanet_1x_coco.py"]

model = dict(
    backbone=dict(
        model_name="biformer_small",
        drop_path_rate=0.2,
        n_win=16,  # 16x16 regions at ~800x1333 (the official COCO setting; 7 in classification)
        pad_mode="original",  # the official auto_pad: BRA maps zero-padded to a multiple of n_win
        pretrained="in1k",
    ),
    neck=dict(in_channels=[64, 128, 256, 512]),
)
