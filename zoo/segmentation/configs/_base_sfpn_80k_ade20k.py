# Semantic FPN (Kirillov et al.) on a zoo backbone, ADE20K 80k iterations: the BiFormer / PVT / UniFormer setting.
# 4 images per GPU x 8 GPUs = 32; AdamW 2e-4, weight decay 1e-4, cosine decay, 1k-iteration warm-up, fp16.
# (The official BiFormer S-FPN test pipeline used UniFormer's AlignResize; mmseg's Resize is used here.)
_base_ = ["./_base_ade20k.py"]

model = dict(
    type="EncoderDecoder",
    data_preprocessor=dict(
        type="SegDataPreProcessor",
        mean=[123.675, 116.28, 103.53],
        std=[58.395, 57.12, 57.375],
        bgr_to_rgb=True,
        pad_val=0,
        seg_pad_val=255,
        size=(512, 512),
    ),
    backbone=dict(
        type="ZooBackbone",
        model_name="biformer_small",
        out_indices=None,  # strides 4, 8, 16, 32
        frozen_stages=-1,
        norm_eval=False,
        out_norm=True,  # LayerNorm2d on each map sent to the decoder, as the BiFormer seg wrapper
        pretrained="in1k",
    ),
    neck=dict(type="FPN", in_channels=[64, 128, 256, 512], out_channels=256, num_outs=4),
    decode_head=dict(
        type="FPNHead",
        in_channels=[256, 256, 256, 256],
        in_index=[0, 1, 2, 3],
        feature_strides=[4, 8, 16, 32],
        channels=128,
        dropout_ratio=0.1,
        num_classes=150,
        norm_cfg=dict(type="SyncBN", requires_grad=True),
        align_corners=False,
        loss_decode=dict(type="CrossEntropyLoss", use_sigmoid=False, loss_weight=1.0),
    ),
    train_cfg=dict(),
    test_cfg=dict(mode="whole"),
)
train_dataloader = dict(batch_size=4)

train_cfg = dict(type="IterBasedTrainLoop", max_iters=80000, val_interval=8000)
val_cfg = dict(type="ValLoop")
test_cfg = dict(type="TestLoop")
optim_wrapper = dict(
    type="AmpOptimWrapper",
    loss_scale="dynamic",
    optimizer=dict(type="AdamW", lr=2e-4, betas=(0.9, 0.999), weight_decay=1e-4),
    paramwise_cfg=dict(norm_decay_mult=0.0),
)
param_scheduler = [
    dict(type="LinearLR", start_factor=1e-6, by_epoch=False, begin=0, end=1000),
    dict(type="CosineAnnealingLR", eta_min=0.0, by_epoch=False, begin=1000, end=80000),
]
