"""Semantic segmentation adapters: ``zoo.segmentation.mmseg`` registers zoo backbones in mmsegmentation.

smp (``encoder_name='tu-<zoo name>'``) and HF UperNet take zoo backbones with no adapter code; see
``zoo.detection`` for torchvision detection and mmdet. Importing this package needs no optional dependency.
"""
