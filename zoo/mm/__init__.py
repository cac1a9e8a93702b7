"""What zoo's OpenMMLab adapters share: ``zoo.detection.mmdet`` and ``zoo.segmentation.mmseg`` build on it alone.

* :mod:`zoo.mm.backbone`: ``ZooBackbone`` (a zoo / timm backbone as an mm backbone) and the layer-wise lr-decay
  optimizer constructor;
* :mod:`zoo.mm.compat`: the mmcv-lite bridge (mmdet / mmseg without compiled mmcv ops) and ``require_mm``;
* :mod:`zoo.mm.cli`: ``zoo det train`` / ``zoo seg train``;
* :mod:`zoo.mm.features`: the feature levels of a ``features_only`` backbone (also used by torchvision detection).

Importing this package needs no optional dependency; mmengine / mmdet / mmseg are imported where they are used.
"""
