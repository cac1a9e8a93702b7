"""``zoo wsi info | extract | heatmap``: the whole-slide command line.

``info`` prints each slide's levels, mpp and reader (exit 1 if one is unreadable), ``extract`` runs
``extract_features`` (exit 1 if a slide failed), ``heatmap`` draws attention over a feature file's
thumbnail. ``zoo.cli`` adds these verbs with ``add_cli``.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from .._cli_errors import parse_json_mapping
from ..data.wsi import HEATMAP_SCALES, SLIDE_SUFFIXES, WSIError, attention_heatmap, open_slide
from ..data.wsi.errors import one_line
from .wsi_extract import extract_features

__all__ = ["add_cli"]


def _slides_from(args_slides: Sequence[str]) -> list[Path]:
    paths: list[Path] = []
    for item in args_slides:
        p = Path(item)
        if p.is_dir():
            found = sorted(q for q in p.iterdir() if q.suffix.lower() in SLIDE_SUFFIXES)
            if not found:
                raise ValueError(
                    f"folder {p} holds no slide files ({', '.join(SLIDE_SUFFIXES)}); pass slide files or their folder"
                )
            paths += found
        else:
            paths.append(p)
    return paths


def _cmd_info(args: argparse.Namespace) -> int:
    """One JSON line per readable slide on stdout, one error line per unreadable one on stderr; 1 if any failed."""
    failed = 0
    for path in _slides_from(args.slides):
        try:
            with open_slide(path, args.reader) as slide:
                print(
                    json.dumps(
                        dict(
                            slide=str(path), reader=slide.reader, vendor=slide.vendor, dimensions=slide.dimensions,
                            levels=slide.level_dimensions, downsamples=slide.level_downsamples, mpp=slide.mpp,
                            objective_power=slide.objective_power,
                        )
                    )
                )  # fmt: skip
        except WSIError as err:
            failed += 1
            print(f"error: {one_line(err, limit=2000)}", file=sys.stderr, flush=True)
    return 1 if failed else 0


def _cmd_extract(args: argparse.Namespace) -> int:
    kwargs = parse_json_mapping(args.backbone_kwargs, "--backbone-kwargs")
    report = extract_features(
        _slides_from(args.slides), args.out, args.backbone, pretrained=args.pretrained, checkpoint=args.checkpoint,
        random_weights=args.random_weights, seed=args.seed, backbone_kwargs=kwargs, tile_size=args.tile_size,
        mpp=args.mpp, magnification=args.magnification, overlap=args.overlap, min_tissue=args.min_tissue,
        fallback_mpp=args.fallback_mpp, input_size=args.input_size, batch_size=args.batch_size, device=args.device,
        reader=args.reader, overwrite=args.overwrite, on_error="raise" if args.strict else "skip",
    )  # fmt: skip
    print(report.summary())
    return 1 if report.failed else 0


def _cmd_heatmap(args: argparse.Namespace) -> int:
    out = attention_heatmap(
        args.features, args.attention, args.out, alpha=args.alpha, scale=args.scale, vmin=args.vmin, vmax=args.vmax
    )
    print(out)
    return 0


def add_cli(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``zoo wsi {info,extract,heatmap}`` to the ``zoo`` command's sub-parsers."""
    p = subparsers.add_parser("wsi", help="whole-slide images: info, tiling + feature extraction, heatmaps")
    sub = p.add_subparsers(dest="wsi_command", required=True)

    info = sub.add_parser("info", help="levels, mpp, vendor and reader of slides (exit 1 if one is unreadable)")
    info.add_argument("slides", nargs="+", help="slide files or folders")
    info.add_argument("--reader", default="auto", choices=["auto", "openslide", "tiffslide"], help="slide reader")
    info.set_defaults(func=_cmd_info)

    ex = sub.add_parser("extract", help="tile slides and write one HDF5 of backbone features per slide (resumable)")
    ex.add_argument("slides", nargs="+", help="slide files or folders")
    ex.add_argument("--out", required=True, help="folder of <slide_id>.h5 feature files")
    ex.add_argument("--backbone", default="resnet18", help="any zoo or timm architecture (pooled features)")
    ex.add_argument("--backbone-kwargs", default="{}", help="JSON kwargs, e.g. '{\"features_only\": true}'")
    weights = ex.add_mutually_exclusive_group()
    weights.add_argument("--pretrained", action="store_true", help="the registry's weights (tag in the name)")
    weights.add_argument("--checkpoint", default=None, help="a state dict file of the backbone without classifier")
    weights.add_argument(
        "--random-weights", action="store_true", help="untrained weights (seeded by --seed): pipeline tests only"
    )
    ex.add_argument("--seed", type=int, default=0, help="seed of the --random-weights build")
    ex.add_argument("--tile-size", type=int, default=256, help="tile side in pixels at the target resolution")
    ex.add_argument("--mpp", type=float, default=0.5, help="target microns per pixel (0.5 ~ 20x)")
    ex.add_argument("--magnification", type=float, default=None, help="target magnification instead of --mpp")
    ex.add_argument("--overlap", type=int, default=0, help="overlap between tiles, pixels at the target resolution")
    ex.add_argument("--min-tissue", type=float, default=0.25, help="minimum tissue fraction of a kept tile")
    ex.add_argument("--fallback-mpp", type=float, default=None, help="level-0 mpp for slides without metadata")
    ex.add_argument("--input-size", type=int, default=None, help="resize tiles to this before the backbone")
    ex.add_argument("--batch-size", type=int, default=64, help="tiles per forward pass")
    ex.add_argument("--device", default="cpu", help="torch device")
    ex.add_argument("--reader", default="auto", choices=["auto", "openslide", "tiffslide"], help="slide reader")
    ex.add_argument("--overwrite", action="store_true", help="redo slides whose feature file is complete")
    ex.add_argument("--strict", action="store_true", help="stop at the first bad slide instead of skipping it")
    ex.set_defaults(func=_cmd_extract)

    hm = sub.add_parser("heatmap", help="attention over the slide thumbnail as a PNG with a colour bar")
    hm.add_argument("features", help="the slide's .h5 feature file")
    hm.add_argument("attention", help=".npy of per-tile attention (N,), numbers only")
    hm.add_argument("--out", required=True, help="PNG path")
    hm.add_argument("--alpha", type=float, default=0.5, help="heat opacity")
    hm.add_argument(
        "--scale", default="rank", choices=HEATMAP_SCALES, help="rank (percentile), minmax, absolute (--vmin..--vmax)"
    )
    hm.add_argument("--vmin", type=float, default=0.0, help="low end of --scale absolute")
    hm.add_argument("--vmax", type=float, default=1.0, help="high end of --scale absolute")
    hm.set_defaults(func=_cmd_heatmap)
    return p
