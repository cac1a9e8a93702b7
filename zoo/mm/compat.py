"""Run mmdet 3.3 / mmseg 1.2 on ``mmcv-lite`` (no compiled ops) by routing the few ops they need to torchvision.

OpenMMLab's last releases accept only mmcv < 2.2, which has no wheel for current torch and must be compiled
(``make mmcv``: about 15-30 minutes, two build fixes). ``mmcv-lite==2.2.0`` is the same Python code without
``mmcv._ext``; with this layer the standard detectors and segmentors train and predict on it:

* ``sys.modules['mmcv._ext']`` becomes a module object whose attributes are looked up lazily (PEP 562), so
  ``import mmcv.ops`` succeeds. Real entries:

  - ``nms`` -> ``torchvision.ops.nms`` (``offset=0``, what mmdet 3 uses);
  - ``roi_align_forward`` / ``roi_align_backward`` -> torchvision's ``roi_align`` kernels (average pooling),
    results copied into the tensors mmcv pre-allocates;
  - ``sigmoid_focal_loss_forward`` / ``_backward`` -> a PyTorch version (mmdet calls it only on CUDA, e.g.
    RetinaNet on a GPU; on CPU mmdet uses its own Python focal loss).

  Every other name is a function that raises ``NotImplementedError`` naming the op and the fix (compiled mmcv).
  On CPU nms and roi_align are bit-identical to compiled mmcv 2.1.0 (measured against a source build of it).
* ``mmcv.__version__`` reads ``'2.1.0'`` when the installed mmcv is ``mmcv-lite`` 2.2.x and the upstream
  ``mmdet`` / ``mmsegmentation`` distributions are installed: their ``__init__`` asserts ``mmcv < 2.2.0``. The
  maintained fork (``onedl-mmdetection`` / ``onedl-mmsegmentation``) has no such assert and is left alone.

Opt in with ``ZOO_MMCV_COMPAT=1`` (read when the adapters ``zoo.detection.mmdet`` / ``zoo.segmentation.mmseg`` load)
or by calling :func:`install` before anything imports ``mmdet`` / ``mmseg``. With a compiled mmcv installed,
:func:`install` does nothing.

mmengine 0.10.7 + torch >= 2.6: ``torch.load`` defaults to ``weights_only=True`` and mmengine's checkpoints
(resume, ``load_from`` with numpy meta) fail to unpickle. Fixes, in order of preference: ``mmengine==0.11.0rc3``
(passes ``weights_only=False`` itself), :func:`trust_local_checkpoints` (registers a local-file loader for
checkpoints you made or trust), or the environment variable ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1``.
"""

from __future__ import annotations

import importlib.machinery
import importlib.metadata
import importlib.util
import os
import sys
import types
from collections.abc import Callable
from typing import Any

import torch

__all__ = [
    "ENV_VAR",
    "MM_INSTALL_HINT",
    "MMCV_BUILD_HINT",
    "MMCVIncompatibleError",
    "compiled_mmcv_available",
    "install",
    "is_installed",
    "maybe_install",
    "require_mm",
    "trust_local_checkpoints",
]

ENV_VAR = "ZOO_MMCV_COMPAT"
MM_INSTALL_HINT = "pip install 'attention-zoo[mm-lite]' (no compiling; or `make mmcv` and 'attention-zoo[mm]')"
MMCV_BUILD_HINT = (
    "build mmcv 2.1.0 with its compiled ops (`make mmcv`, about 15-30 minutes on 2 cores) and install the wheel"
)
_LITE_FAKE_VERSION = "2.1.0"  # the newest version upstream mmdet 3.3 / mmseg 1.2 accept
_MARK = "__zoo_mmcv_compat__"


class MMCVIncompatibleError(ImportError):
    """The installed mmcv cannot serve mmdet / mmseg; the message names the fix."""


def _dist_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def is_installed() -> bool:
    """True when this layer's ``mmcv._ext`` stand-in is registered."""
    return getattr(sys.modules.get("mmcv._ext"), _MARK, False)


def compiled_mmcv_available() -> bool:
    """True when a real, compiled ``mmcv._ext`` extension can be imported (mmcv built with ops)."""
    if is_installed():
        return False
    try:
        return importlib.util.find_spec("mmcv._ext") is not None
    except (ImportError, ValueError):  # no mmcv at all
        return False


# ----------------------------------------------------------------------------------------------------------------
# The ops


def _nms(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float, offset: int = 0) -> torch.Tensor:
    """mmcv ``nms``: boxes (N, 4) xyxy, scores (N,) -> kept indices (K,) int64, highest score first."""
    import torchvision

    if offset != 0:  # mmdet 3 always passes 0; offset 1 is the legacy "+1 pixel" box convention
        raise NotImplementedError(
            f"mmcv op 'nms' with offset={offset}: the zoo compatibility layer (torchvision) supports offset=0 only; "
            f"{MMCV_BUILD_HINT}"
        )
    return torchvision.ops.nms(boxes, scores, float(iou_threshold))


def _roi_align_forward(
    input: torch.Tensor,
    rois: torch.Tensor,
    output: torch.Tensor,
    argmax_y: torch.Tensor,
    argmax_x: torch.Tensor,
    aligned_height: int,
    aligned_width: int,
    spatial_scale: float,
    sampling_ratio: int,
    pool_mode: int,
    aligned: bool,
) -> None:
    """mmcv ``roi_align_forward``: input (B, C, H, W), rois (K, 5) [batch, x1, y1, x2, y2] -> output (K, C, h, w)."""
    if pool_mode != 1:
        raise NotImplementedError(
            "mmcv op 'roi_align_forward' with pool_mode='max': the zoo compatibility layer (torchvision) supports "
            f"pool_mode='avg' only; {MMCV_BUILD_HINT}"
        )
    import torchvision  # noqa: F401  (registers torch.ops.torchvision)

    # torchvision's kernel is the same algorithm (adaptive sampling for sampling_ratio <= 0, the same
    # half-pixel shift when aligned): bit-identical to mmcv's CPU kernel
    result = torch.ops.torchvision.roi_align(
        input, rois, float(spatial_scale), int(aligned_height), int(aligned_width), int(sampling_ratio), bool(aligned)
    )
    output.copy_(result)


def _roi_align_backward(
    grad_output: torch.Tensor,
    rois: torch.Tensor,
    argmax_y: torch.Tensor,
    argmax_x: torch.Tensor,
    grad_input: torch.Tensor,
    aligned_height: int,
    aligned_width: int,
    spatial_scale: float,
    sampling_ratio: int,
    pool_mode: int,
    aligned: bool,
) -> None:
    """mmcv ``roi_align_backward``: grad_output (K, C, h, w) -> fills grad_input (B, C, H, W)."""
    if pool_mode != 1:
        raise NotImplementedError(
            "mmcv op 'roi_align_backward' with pool_mode='max': the zoo compatibility layer (torchvision) supports "
            f"pool_mode='avg' only; {MMCV_BUILD_HINT}"
        )
    import torchvision  # noqa: F401

    b, c, h, w = grad_input.shape
    result = torch.ops.torchvision._roi_align_backward(
        grad_output,
        rois,
        float(spatial_scale),
        int(aligned_height),
        int(aligned_width),
        b,
        c,
        h,
        w,
        int(sampling_ratio),
        bool(aligned),
    )
    grad_input.copy_(result)


def _focal_terms(logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor, gamma: float, alpha: float):
    """Element-wise sigmoid focal loss (N, C) as mmcv's kernel defines it; target (N,) with C meaning background."""
    p = logits.sigmoid()
    tiny = torch.finfo(logits.dtype).tiny  # the kernel clamps the log argument at FLT_MIN
    positive = target[:, None] == torch.arange(logits.shape[1], device=logits.device)[None]
    pos = -alpha * (1 - p).pow(gamma) * p.clamp_min(tiny).log()
    neg = -(1 - alpha) * p.pow(gamma) * (1 - p).clamp_min(tiny).log()
    loss = torch.where(positive, pos, neg)
    if weight.numel():
        loss = loss * weight[target.clamp_max(weight.numel() - 1)][:, None]
    return loss


def _sigmoid_focal_loss_forward(
    input: torch.Tensor, target: torch.Tensor, weight: torch.Tensor, output: torch.Tensor, gamma: float, alpha: float
) -> None:
    """mmcv ``sigmoid_focal_loss_forward``: logits (N, C), target (N,) -> fills output (N, C)."""
    output.copy_(_focal_terms(input, target, weight, float(gamma), float(alpha)))


def _sigmoid_focal_loss_backward(
    input: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor,
    grad_input: torch.Tensor,
    gamma: float,
    alpha: float,
) -> None:
    """mmcv ``sigmoid_focal_loss_backward``: fills grad_input (N, C) with d(sum of the loss)/d(logits)."""
    with torch.enable_grad():
        x = input.detach().requires_grad_(True)
        (grad,) = torch.autograd.grad(_focal_terms(x, target, weight, float(gamma), float(alpha)).sum(), x)
    grad_input.copy_(grad)


_OPS: dict[str, Callable[..., Any]] = {
    "nms": _nms,
    "roi_align_forward": _roi_align_forward,
    "roi_align_backward": _roi_align_backward,
    "sigmoid_focal_loss_forward": _sigmoid_focal_loss_forward,
    "sigmoid_focal_loss_backward": _sigmoid_focal_loss_backward,
}


def _missing_op(name: str) -> Callable[..., Any]:
    def op(*args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError(
            f"mmcv op {name!r} needs mmcv's compiled extension, which mmcv-lite does not have (the zoo compatibility "
            f"layer provides only {', '.join(sorted(_OPS))}); {MMCV_BUILD_HINT}, or use a model without this op"
        )

    op.__name__ = op.__qualname__ = name
    return op


def _module_getattr(name: str) -> Any:
    # dunders must stay missing: inspect.getmodule / pickling probe __file__, __path__, __spec__ ...
    if name.startswith("__"):
        raise AttributeError(name)
    return _OPS.get(name) or _missing_op(name)


# ----------------------------------------------------------------------------------------------------------------
# Installation


def _uses_upstream_mm() -> bool:
    """Upstream mmdet / mmsegmentation installed (they assert mmcv < 2.2.0); the onedl-* fork does not."""
    return _dist_version("mmdet") is not None or _dist_version("mmsegmentation") is not None


def install(override_version: bool | None = None) -> str:
    """Make mmdet / mmseg importable on ``mmcv-lite``; idempotent. Call before importing mmdet / mmseg.

    Args:
        override_version: report mmcv as ``2.1.0`` so upstream mmdet 3.3 / mmseg 1.2 accept mmcv-lite 2.2.
            ``None`` (default): only when mmcv is ``mmcv-lite`` 2.2.x and upstream mmdet / mmsegmentation are
            installed.

    Returns:
        ``'compiled'`` (a compiled mmcv is present: nothing done) or ``'lite'`` (the layer is active).

    Raises:
        ImportError: no mmcv installed (names the ``[mm-lite]`` extra).
        MMCVIncompatibleError: an mmcv without compiled ops that is not mmcv-lite 2.x.
    """
    try:
        import mmcv
    except ImportError as e:
        raise ImportError(
            f"mmcv is not installed: {MM_INSTALL_HINT} (mmcv-lite, mmengine, mmdet, mmsegmentation) ({e})"
        ) from e
    if compiled_mmcv_available():
        return "compiled"
    lite = _dist_version("mmcv-lite")
    version = str(getattr(mmcv, "__version__", "?"))
    if lite is None and not is_installed():
        full = _dist_version("mmcv") or _dist_version("onedl-mmcv")
        if not str(version).startswith("2."):
            raise MMCVIncompatibleError(
                f"mmcv {version} is installed but mmdet 3 / mmseg 1 need mmcv 2.x: {MM_INSTALL_HINT} "
                f"(mmcv-lite 2.2.0 + this layer) or {MMCV_BUILD_HINT}"
            )
        if full is not None:  # a full mmcv distribution whose extension is missing: a broken or ops-less build
            raise MMCVIncompatibleError(
                f"mmcv {full} is installed without its compiled extension mmcv._ext (built with MMCV_WITH_OPS=0?); "
                f"either {MMCV_BUILD_HINT}, or `pip uninstall mmcv && pip install mmcv-lite==2.2.0` and use the zoo "
                f"compatibility layer ({ENV_VAR}=1)"
            )
    if not is_installed():
        ext = types.ModuleType("mmcv._ext", "zoo stand-in for mmcv's compiled ops (zoo.mm.compat)")
        setattr(ext, _MARK, True)
        # a spec without a loader: find_spec() works, and pkgutil.find_loader() (upstream mmengine's
        # mmcv_full_available) still reports "no compiled mmcv"; onedl-mmengine probes with find_spec() and reports
        # it available, which is harmless (it then only imports mmcv.ops classes for isinstance checks)
        ext.__spec__ = importlib.machinery.ModuleSpec("mmcv._ext", None)
        ext.__getattr__ = _module_getattr  # PEP 562: every name resolves, missing ops raise only when called
        sys.modules["mmcv._ext"] = ext
        mmcv._ext = ext
    if override_version is None:
        override_version = lite is not None and version.startswith("2.2") and _uses_upstream_mm()
    if override_version and mmcv.__version__ != _LITE_FAKE_VERSION:
        mmcv.__version__ = _LITE_FAKE_VERSION
        mmcv.version_info = (2, 1, 0)  # type: ignore[attr-defined]
        if "mmcv.version" in sys.modules:
            sys.modules["mmcv.version"].__version__ = _LITE_FAKE_VERSION
            sys.modules["mmcv.version"].version_info = (2, 1, 0)
    return "lite"


def maybe_install() -> str | None:
    """Call :func:`install` when ``ZOO_MMCV_COMPAT`` is set to 1/true/yes/on; returns its result or None."""
    if os.environ.get(ENV_VAR, "").strip().lower() in ("1", "true", "yes", "on"):
        return install()
    return None


def require_mm(package: str) -> types.ModuleType:
    """Import ``'mmdet'`` or ``'mmseg'`` (after :func:`maybe_install`) with errors that name the fix."""
    try:
        import mmcv  # noqa: F401
        import mmengine  # noqa: F401
    except ImportError as e:
        raise ImportError(
            f"zoo's {package} adapter needs the OpenMMLab packages: {MM_INSTALL_HINT} ({e.__class__.__name__}: {e})"
        ) from e
    maybe_install()
    try:
        module = importlib.import_module(package)
        importlib.import_module(f"{package}.models")  # imports mmcv.ops: fails here without compiled ops
    except AssertionError as e:  # the version asserts in mmdet / mmseg __init__
        raise MMCVIncompatibleError(
            f"{package} refuses the installed mmcv ({e}). With mmcv-lite 2.2.0 enable zoo's compatibility layer: "
            f"set {ENV_VAR}=1 or call zoo.mm.compat.install() before importing {package}; otherwise "
            f"{MMCV_BUILD_HINT}"
        ) from e
    except ModuleNotFoundError as e:
        if e.name == "mmcv._ext":
            raise MMCVIncompatibleError(
                f"mmcv has no compiled ops (No module named 'mmcv._ext'): set {ENV_VAR}=1 or call "
                f"zoo.mm.compat.install() before importing {package} (nms / roi_align via torchvision), "
                f"or {MMCV_BUILD_HINT}"
            ) from e
        if e.name in ("ftfy", "regex"):
            raise ImportError(f"{package} needs {e.name!r}, which it does not declare: {MM_INSTALL_HINT}") from e
        if e.name and e.name.split(".")[0] in ("mmdet", "mmseg", "mmcv", "mmengine"):
            raise ImportError(f"zoo's {package} adapter needs {e.name!r}: {MM_INSTALL_HINT}") from e
        raise
    return module


# ----------------------------------------------------------------------------------------------------------------
# mmengine checkpoints under torch.load(weights_only=True)


def _load_trusted_local(filename: str, map_location: Any = None) -> Any:
    """mmengine local-file loader that unpickles the whole checkpoint (message hub, numpy meta included)."""
    path = os.path.expanduser(filename)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{filename} can not be found.")
    # weights_only=False runs pickle: only for checkpoints this user wrote or trusts (see trust_local_checkpoints)
    return torch.load(path, map_location=map_location, weights_only=False)


def trust_local_checkpoints() -> bool:
    """Let mmengine < 0.11 load its own full checkpoints (resume, ``load_from``) on torch >= 2.6.

    Registers a local-file loader for mmengine's ``CheckpointLoader`` that calls ``torch.load(weights_only=False)``.
    Unpickling runs code from the file: use it for checkpoints you wrote or trust. Not needed (and not done) with
    mmengine >= 0.11.0rc3, which already passes ``weights_only=False``. Returns True when the loader was registered.
    """
    import mmengine
    from mmengine.runner.checkpoint import CheckpointLoader

    major_minor = tuple(int(p) for p in mmengine.__version__.split(".")[:2] if p.isdigit())
    if major_minor >= (0, 11):
        return False
    CheckpointLoader.register_scheme(prefixes="", loader=_load_trusted_local, force=True)
    return True
