"""Slide feature extraction: tile each slide and embed its tiles with a zoo/timm backbone into the feature store.

``extract_features(slides, out_dir, backbone=...)`` writes one HDF5 per slide in the layout of
``zoo.data.wsi.features``, under a temporary name renamed when complete. It is a task (it builds and runs a
model), so it lives here, on the data layer's readers, tiling and feature store. Every file records what
made its features (backbone, weights' identity, settings): a rerun skips a slide only when they match, and
a folder never ends up holding features made two ways. The ``zoo wsi`` command line is in
``zoo.train.wsi_cli``.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .._io import clean_temporaries
from ..data.wsi import (
    FeatureMismatchError,
    NoTissueError,
    Slide,
    SlideReadError,
    TileGrid,
    WSIError,
    detect_tissue,
    open_slide,
    slide_id_of,
    tile_grid,
)
from ..data.wsi.errors import one_line
from ..data.wsi.features import atomic_h5, describe_diff, stored_provenance
from ..data.wsi.tiling import read_tiles_skipping

__all__ = ["ExtractionReport", "extract_features"]


def _sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _sha256_state_dict(module: Any) -> str:
    """sha256 of a module's state dict: names, dtypes, shapes and bytes of every tensor, in name order."""
    import torch

    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _pretrained_identity(model: Any, name: str) -> str:
    """``pretrained:<arch>.<tag>`` from the built model's pretrained_cfg, ``@sha256:<hex>`` when its file is local."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    if hasattr(cfg, "to_dict"):
        cfg = cfg.to_dict()
    arch = cfg.get("architecture") or name.split(".")[0]
    tag = cfg.get("tag")
    identity = f"pretrained:{arch}.{tag}" if tag else f"pretrained:{arch}"
    file = cfg.get("file")
    if file and Path(file).is_file():
        identity += f"@sha256:{_sha256_file(file)}"
    return identity


def _create_from_checkpoint(name: str, checkpoint: str | os.PathLike, build: dict[str, Any]) -> Any:
    """``name`` built with ``build`` kwargs and ``checkpoint`` loaded strictly; failures become one clear error."""
    import zoo
    from zoo._io import CorruptFileError, UnsafeFileError, safe_load

    try:
        return zoo.create_model(name, checkpoint_path=str(checkpoint), **build)
    except (UnsafeFileError, CorruptFileError):
        raise
    except Exception as err:  # noqa: BLE001 - timm / torch raise many types; diagnosed below
        reason = one_line(err)
    safe_load(checkpoint, what="checkpoint")  # a file that needs pickle or is damaged: that error, naming it
    raise ValueError(
        f"checkpoint {checkpoint} does not load into {name} ({json.dumps(build, default=str)}): {reason}. Pass the "
        "backbone's state dict without its classifier, saved from the same architecture and backbone kwargs "
        "(model.reset_classifier(0); torch.save(model.state_dict(), path))"
    )


class _Embedder:
    """A zoo/timm backbone as a tile embedder: uint8 tiles ``(n, s, s, 3)`` -> features ``(n, D)``.

    ``weights`` says where the weights come from (``pretrained:...``, ``file:sha256:...``, ``random:seed=...``,
    ``module:sha256:...``; see ``zoo.data.wsi.features``).
    """

    def __init__(
        self,
        backbone: str | Any,
        *,
        pretrained: bool = False,
        checkpoint: str | os.PathLike | None = None,
        seed: int = 0,
        input_size: int | None = None,
        device: str = "cpu",
        backbone_kwargs: dict[str, Any] | None = None,
    ) -> None:
        import torch

        import zoo

        self.kwargs = dict(backbone_kwargs or {})
        if isinstance(backbone, str):
            self.name = backbone
            self.features_only = bool(self.kwargs.get("features_only"))
            build = dict(self.kwargs) if self.features_only else dict(self.kwargs, num_classes=0)
            if checkpoint is not None:
                self.weights = f"file:sha256:{_sha256_file(checkpoint)}"
                model = _create_from_checkpoint(backbone, checkpoint, build)
            elif pretrained:
                model = zoo.create_model(backbone, pretrained=True, **build)
                self.weights = _pretrained_identity(model, backbone)
            else:  # random weights (asked for explicitly): seeded, so a rerun rebuilds the same network
                with torch.random.fork_rng(devices=[]):  # leaves the caller's RNG as it was
                    torch.manual_seed(seed)
                    model = zoo.create_model(backbone, **build)
                self.weights = f"random:seed={seed}"
        else:  # a module: pooled features from forward, or a list of maps (features_only)
            model, self.name = backbone, type(backbone).__name__
            self.features_only = hasattr(model, "feature_info") and hasattr(model, "return_layers")
            self.weights = f"module:sha256:{_sha256_state_dict(model)}"
        self.random = self.weights.startswith("random:")
        cfg = getattr(model, "pretrained_cfg", None) or {}
        self.mean = torch.tensor(cfg.get("mean", (0.485, 0.456, 0.406)), dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(cfg.get("std", (0.229, 0.224, 0.225)), dtype=torch.float32).view(1, 3, 1, 1)
        self.input_size = input_size
        self.device = torch.device(device)
        self.model = model.eval().to(self.device)
        self.mean, self.std = self.mean.to(self.device), self.std.to(self.device)

    def __call__(self, tiles: np.ndarray) -> np.ndarray:
        import torch
        import torch.nn.functional as F

        with torch.inference_mode():
            x = torch.from_numpy(tiles).to(self.device).permute(0, 3, 1, 2).float().div_(255)
            if self.input_size and x.shape[-1] != self.input_size:
                x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear", antialias=True)
            x = (x - self.mean) / self.std
            out = self.model(x)
            if self.features_only or isinstance(out, (list, tuple)):
                out = out[-1] if isinstance(out, (list, tuple)) else out
                out = out.mean(dim=(-2, -1)) if out.ndim == 4 else out
            return out.float().cpu().numpy()


def _provenance(
    embedder: _Embedder,
    tile_size: int,
    mpp: float | None,
    magnification: float | None,
    input_size: int | None,
    float16: bool,
) -> dict[str, Any]:
    """What makes the features what they are; a rerun must match it to reuse a file. As stored (JSON types)."""
    record = dict(
        backbone=embedder.name,
        backbone_kwargs=embedder.kwargs,
        weights=embedder.weights,
        input_size=int(input_size or tile_size),  # what the backbone saw
        tile_size=int(tile_size),
        target_mpp=mpp,
        target_magnification=magnification,
        feature_dtype="float16" if float16 else "float32",
    )
    return json.loads(json.dumps(record, sort_keys=True, default=str))


@dataclass
class ExtractionReport:
    """What ``extract_features`` did: written, skipped (already done) and failed slides, unreadable tiles,
    the weights' identity and timings."""

    written: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    skipped_tiles: dict[str, int] = field(default_factory=dict)  # slide id -> unreadable tiles left out
    tile_errors: dict[str, str] = field(default_factory=dict)  # slide id -> the first tile's read error
    weights: str = ""
    tiles: int = 0
    read_s: float = 0.0
    embed_s: float = 0.0
    wall_s: float = 0.0

    @property
    def tiles_per_s(self) -> float:
        return self.tiles / self.wall_s if self.wall_s else 0.0

    def summary(self) -> str:
        unreadable = sum(self.skipped_tiles.values())
        lines = [
            f"{len(self.written)} slide(s) written, {len(self.skipped)} already done (skipped), "
            f"{len(self.failed)} failed; {self.tiles} tiles in {self.wall_s:.1f} s ({self.tiles_per_s:.1f} tiles/s; "
            f"reading {self.read_s:.1f} s, embedding {self.embed_s:.1f} s)"
            + (f"; {unreadable} unreadable tile(s) skipped in {len(self.skipped_tiles)} slide(s)" if unreadable else "")
        ]
        if self.weights.startswith("random:"):
            lines.append(f"  weights {self.weights}: RANDOM, untrained; the features describe no tissue")
        lines += [
            f"  slide {sid}: {n} unreadable tile(s) skipped (first: {self.tile_errors.get(sid, '')})"
            for sid, n in self.skipped_tiles.items()
        ]
        lines += [f"  failed {name}: {reason}" for name, reason in self.failed.items()]
        return "\n".join(lines)


def _is_finished(target: Path, slide_id: str, wanted: Callable[[], dict[str, Any]]) -> bool:
    """Whether ``target`` is finished and made as ``wanted()`` (the requested provenance) says: skip it.

    An absent, unfinished or unreadable file is False (extract it).

    Raises:
        FeatureMismatchError: the file is finished but made otherwise (names each differing value), or it has
            no provenance (an older zoo).
    """
    if not target.exists():
        return False
    complete, stored = stored_provenance(target)
    if not complete:
        return False
    requested = wanted()
    fix = "pass --overwrite (overwrite=True) to re-extract, or another --out folder"
    if stored is None:
        raise FeatureMismatchError(
            f"feature file {target} (slide {slide_id}) has no provenance: it was written by an older zoo that did "
            f"not record the weights and settings, so it cannot be checked against this run "
            f"({requested['backbone']}, weights {requested['weights']}); {fix}"
        )
    diff = describe_diff(stored, requested, "stored", "requested")
    if diff:
        raise FeatureMismatchError(
            f"feature file {target} (slide {slide_id}) was extracted differently: {diff}. Features made two ways "
            f"must not share a folder; {fix}"
        )
    return True


def _check_weight_source(
    backbone: str | Any, pretrained: bool, checkpoint: str | os.PathLike | None, random_weights: bool
) -> None:
    """Exactly one source of weights for a registry name; none for a module (it has its own)."""
    if not isinstance(backbone, str):
        if pretrained or checkpoint is not None:
            raise ValueError(
                f"backbone is a module ({type(backbone).__name__}) with its own weights; pretrained= and "
                "checkpoint= apply to registry names only: load the weights into the module before passing it"
            )
        return
    sources = {"pretrained": pretrained, "checkpoint": checkpoint is not None, "random_weights": random_weights}
    chosen = [name for name, given in sources.items() if given]
    if len(chosen) != 1:
        problem = "no source of weights was given" if not chosen else f"{' and '.join(chosen)} were given together"
        raise ValueError(
            f"backbone {backbone!r}: {problem}; pass exactly one of pretrained=True (--pretrained: the "
            "registry's weights), checkpoint=PATH (--checkpoint: a state dict file of this backbone) or "
            "random_weights=True (--random-weights: untrained, for pipeline tests only; features of random "
            "weights describe no tissue)"
        )
    if checkpoint is not None and not Path(checkpoint).is_file():
        raise FileNotFoundError(f"checkpoint {checkpoint} does not exist; pass the path of a state dict file")


def extract_features(
    slides: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    backbone: str | Any = "resnet18",
    *,
    pretrained: bool = False,
    checkpoint: str | os.PathLike | None = None,
    random_weights: bool = False,
    seed: int = 0,
    backbone_kwargs: dict[str, Any] | None = None,
    tile_size: int = 256,
    mpp: float | None = 0.5,
    magnification: float | None = None,
    overlap: int = 0,
    min_tissue: float = 0.25,
    fallback_mpp: float | None = None,
    input_size: int | None = None,
    batch_size: int = 64,
    device: str = "cpu",
    reader: str = "auto",
    float16: bool = True,
    thumbnail_size: int = 1024,
    overwrite: bool = False,
    on_error: str = "skip",
    progress: bool = True,
) -> ExtractionReport:
    """Tile every slide and embed its tiles with a zoo/timm backbone into ``out_dir/<slide_id>.h5``.

    Each file is written under a temporary name and renamed when complete, so an interrupted run leaves no
    half-written file (and the next run removes the temporary ones a killed run left). A rerun skips slides
    whose file is complete and was made the same way (backbone, kwargs, weights, input size, tile size,
    target resolution, dtype: the file's ``provenance``); a file made otherwise, or an older file without
    provenance, stops the run with ``FeatureMismatchError`` before anything is written. Tiles that cannot
    be read are left out and counted (``skipped_tiles``); a slide with no readable tile fails. Tiles are read
    in a background thread while the previous batch is embedded.

    Args:
        slides: slide paths (the slide id is the file stem; ids must be unique).
        backbone: zoo/timm architecture name (pooled features, ``num_classes=0``; or
            ``backbone_kwargs={'features_only': True}``: the last map, average-pooled), or a module (its
            weights are identified by the sha256 of its state dict).
        pretrained, checkpoint, random_weights: where a named backbone's weights come from; exactly one:
            the registry's pretrained weights, a state dict file (loaded strictly, without pickle), or
            untrained weights built under ``seed`` (a loud warning: for pipeline tests only).
        tile_size, mpp, magnification, overlap, min_tissue, fallback_mpp: see ``tile_grid``.
        input_size: resize tiles to this before the backbone (ACMIL: 256-px tiles -> 224).
        on_error: ``'skip'`` counts and reports failing slides (unreadable, no tissue, no mpp) and goes on;
            ``'raise'`` stops at the first.

    Returns:
        ExtractionReport with written / skipped / failed slides, unreadable tiles and the read vs embed time.

    Raises:
        ValueError: no (or more than one) source of weights for a named backbone, duplicate slide ids.
        FeatureMismatchError: a finished file in ``out_dir`` was made differently (names both values).
    """
    if on_error not in ("skip", "raise"):
        raise ValueError(f"on_error={on_error!r}; expected 'skip' or 'raise'")
    _check_weight_source(backbone, pretrained, checkpoint, random_weights)
    out_dir = Path(out_dir)
    ids = [slide_id_of(p) for p in slides]
    dup = {i for i in ids if ids.count(i) > 1}
    if dup:
        raise ValueError(f"slide ids must be unique (file stems); duplicated: {sorted(dup)}")
    clean_temporaries(out_dir)  # half-written files of a run that was killed
    report = ExtractionReport()
    start = time.perf_counter()
    built: dict[str, Any] = {}

    def prepared() -> tuple[_Embedder, dict[str, Any]]:
        """The embedder and the provenance it gives, built on first need (a run of failing slides builds none)."""
        if not built:
            embedder = _Embedder(
                backbone, pretrained=pretrained, checkpoint=checkpoint, seed=seed, input_size=input_size,
                device=device, backbone_kwargs=backbone_kwargs,
            )  # fmt: skip
            provenance = _provenance(embedder, tile_size, mpp, magnification, input_size, float16)
            built.update(embedder=embedder, provenance=provenance)
            report.weights = embedder.weights
        return built["embedder"], built["provenance"]

    def announce(embedder: _Embedder) -> None:
        """Say it loudly, once, before the first features of random weights are written."""
        if embedder.random and not built.get("announced"):
            built["announced"] = True
            print(
                f"WARNING: {embedder.name} has RANDOM weights ({embedder.weights}): these features describe no "
                "tissue. Use them to test the pipeline only, never to train or report a model; pass "
                "--pretrained or --checkpoint for real features.",
                file=sys.stderr,
                flush=True,
            )

    # finished files first: a folder never ends up holding features made two ways
    requested = lambda: prepared()[1]  # the backbone is built only when some file is finished
    done = set() if overwrite else {sid for sid in ids if _is_finished(out_dir / f"{sid}.h5", sid, requested)}

    for path, sid in zip(slides, ids):
        if sid in done:
            report.skipped.append(sid)
            continue
        target = out_dir / f"{sid}.h5"
        try:
            with open_slide(path, reader) as slide:
                thumb = slide.get_thumbnail(thumbnail_size)
                mask = detect_tissue(thumb)
                if not mask.any():
                    raise NoTissueError(f"slide {slide.path}: no tissue found on the thumbnail")
                grid = tile_grid(slide, tile_size, mpp, magnification, overlap, mask, min_tissue, fallback_mpp)
                embedder, wanted = prepared()
                announce(embedder)
                feats, kept, errors = _embed_slide(
                    slide, grid, embedder, batch_size, report, progress and len(grid) > batch_size
                )
                if not kept.any():
                    raise SlideReadError(
                        f"slide {slide.path}: none of its {len(grid)} tiles could be read (first error: "
                        f"{errors[0]}); the file is damaged: export or scan it again"
                    )
                skipped = int(len(grid) - kept.sum())
                if skipped:
                    report.skipped_tiles[sid], report.tile_errors[sid] = skipped, errors[0]
                with atomic_h5(target) as f:
                    f.create_dataset("features", data=feats.astype(np.float16 if float16 else np.float32))
                    f.create_dataset("coords", data=grid.coords[kept])
                    f.create_dataset("thumbnail", data=thumb, compression="gzip")
                    f.create_dataset("tissue_mask", data=mask, compression="gzip")
                    f.create_dataset("tissue_fraction", data=grid.tissue_fraction[kept].astype(np.float32))
                    import zoo

                    f.attrs.update(
                        slide_id=sid,
                        slide_path=str(Path(path).resolve()),
                        backbone=embedder.name,
                        backbone_kwargs=json.dumps(wanted["backbone_kwargs"], sort_keys=True),
                        weights=embedder.weights,
                        input_size=wanted["input_size"],
                        feature_dim=int(feats.shape[1]),
                        feature_dtype=wanted["feature_dtype"],
                        provenance=json.dumps(wanted, sort_keys=True),
                        tile_size=grid.tile_size,
                        tile_size_level0=grid.size_level0,
                        target_mpp=grid.target_mpp if grid.target_mpp is not None else np.nan,
                        mpp=slide.mpp if slide.mpp is not None else np.nan,
                        read_level=grid.level,
                        downsample=grid.downsample,
                        vendor=slide.vendor,
                        reader=slide.reader,
                        dimensions=np.asarray(slide.dimensions),
                        skipped_tiles=skipped,
                        zoo_version=zoo.__version__,
                        complete=True,
                    )
            report.written.append(sid)
        except WSIError as err:
            if on_error == "raise":
                raise
            report.failed[sid] = str(err)
    report.wall_s = time.perf_counter() - start
    return report


def _embed_slide(
    slide: Slide, grid: TileGrid, embedder: _Embedder, batch_size: int, report: ExtractionReport, progress: bool
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Features ``(M, D)`` of the readable tiles of ``grid``, the mask ``(N,)`` of which tiles they are, and the
    read errors of the others; reading overlaps embedding (one reader thread)."""
    batches = [slice(i, min(i + batch_size, len(grid))) for i in range(0, len(grid), batch_size)]
    bar = None
    if progress:
        try:
            from zoo.train.metrics import Progress

            bar = Progress(len(batches), desc=f"embed {slide.name}")
        except ImportError:
            bar = None

    def read(batch: slice) -> tuple[np.ndarray, np.ndarray, list[str], float]:
        t0 = time.perf_counter()
        tiles, ok, errors = read_tiles_skipping(slide, grid, batch)
        return tiles, ok, errors, time.perf_counter() - t0

    outputs, kept, errors = [], [], []
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(read, batches[0])
        for i in range(len(batches)):
            tiles, ok, batch_errors, read_s = pending.result()
            if i + 1 < len(batches):
                pending = pool.submit(read, batches[i + 1])
            kept.append(ok)
            errors += batch_errors
            if len(tiles):
                t0 = time.perf_counter()
                outputs.append(embedder(tiles))
                report.embed_s += time.perf_counter() - t0
            report.read_s += read_s
            report.tiles += len(tiles)
            if bar is not None:
                bar.update()
    if bar is not None:
        bar.close()
    feats = np.concatenate(outputs) if outputs else np.zeros((0, 0), dtype=np.float32)
    return feats, np.concatenate(kept), errors
