"""Packaging for attention-zoo (import name ``zoo``)."""

import re
from pathlib import Path

from setuptools import find_packages, setup

_version = re.search(r'__version__ = "([^"]+)"', Path("zoo/version.py").read_text()).group(1)

# mmdet 3.3 / mmseg 1.2 and what they need besides mmcv; the extras differ only in the mmcv they take
_MM = ["mmengine>=0.10.7,<1", "mmdet==3.3.0", "mmsegmentation==1.2.2", "ftfy", "regex"]

setup(
    name="attention-zoo",
    version=_version,
    description="A timm-style zoo of attention vision backbones and heads on fused Triton kernels",
    long_description=Path("README.md").read_text(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["zoo", "zoo.*"]),
    package_data={"zoo": ["train/recipes/*.yaml", "detection/configs/**/*.py", "segmentation/configs/**/*.py"]},
    install_requires=[
        "torch>=2.4",
        "torchvision",
        "timm>=1.0.21",
        "triton; platform_system == 'Linux'",
        "safetensors",
        "huggingface_hub",
        "tqdm",
        "rich",
        "pyyaml",
    ],
    extras_require={
        "dev": [
            "pytest>=8",
            "pytest-timeout",
            "ruff",
            "scikit-learn",
            "scikit-image",
            "matplotlib",
            "tensorboard",
            "webdataset",
            "h5py",
            "tifffile",
            "tiffslide",
            "openslide-python",
            "openslide-bin",
            "scipy",
            "multimatch-gaze",
            "pandas",
            "pydicom",
            "pydicom-data",
            "segmentation-models-pytorch>=0.6",
            "transformers>=5",
            # ONNX export (tests/models/test_onnx.py): the dynamo exporter needs onnx + onnxscript; onnxruntime runs it
            "onnx>=1.17",
            "onnxscript>=0.6",  # torch 2.11+ calls its _framework_apis.torch_2_11
            "onnxruntime>=1.20",
            # the mm adapters' tests run on the no-compile path (mmcv-lite + zoo.detection.mmcv_compat)
            "mmcv-lite==2.2.0",
            *_MM,
        ],
        "train": ["matplotlib", "tensorboard", "webdataset", "scikit-learn"],
        "detection": ["pycocotools"],
        "segmentation": ["segmentation-models-pytorch>=0.6", "transformers>=5"],
        "wsi": ["openslide-python", "openslide-bin", "tiffslide", "tifffile", "h5py", "scikit-image", "scipy"],
        "scanpath": ["scikit-image", "multimatch-gaze", "pillow"],
        "medical": ["pydicom", "pillow"],
        "wandb": ["wandb"],
        # mmdet 3.3 / mmseg 1.2 with the mmcv they accept (< 2.2: no wheel with ops for torch 2.14, so build it
        # first with `make mmcv`), or "mm-lite": mmcv-lite (mmcv 2.2 without ops) and zoo's compatibility layer
        "mm": ["mmcv>=2.0.0rc4,<2.2.0", *_MM],
        "mm-lite": ["mmcv-lite==2.2.0", *_MM],
    },
    entry_points={"console_scripts": ["zoo=zoo.cli:main"]},
    classifiers=[
        "Programming Language :: Python :: 3",
        "License :: OSI Approved :: Apache Software License",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
