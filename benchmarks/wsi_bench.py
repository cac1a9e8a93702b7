"""Tiling + feature-extraction throughput on a ~20k-tile slide built from scikit-image's IHC image.

    python benchmarks/wsi_bench.py [--tiles 20000] [--tile-size 64] [--backbone test_convnext] [--device cpu]

Prints tiles/s and the split between reading tiles (OpenSlide / tiffslide, in a background thread) and
embedding them, so one can see whether the reader is the bottleneck. Appends a row to
benchmarks/results/wsi_bench.csv with the date, the machine (host, CPU model or GPU name and torch threads,
core count, 1-minute load average before and after: a shared machine's other work shows there), the Python /
torch / reader versions and the read vs embed split. A results file written with
another header is left alone and the row goes to a sibling file named after the new header's hash.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import hashlib
import math
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def build_slide(folder: Path, tiles: int, tile_size: int) -> Path:
    """A square slide of about ``tiles`` tissue tiles: the IHC image mirrored into a mosaic, mpp 0.5."""
    import skimage.data

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the tests' slide writer
    from wsi_fixtures import write_pyramidal_tiff

    side = math.ceil(math.sqrt(tiles)) * tile_size
    ihc = skimage.data.immunohistochemistry()
    block = np.concatenate([np.concatenate([ihc, ihc[:, ::-1]], 1), np.concatenate([ihc[::-1], ihc[::-1, ::-1]], 1)])
    reps = math.ceil(side / block.shape[0])
    image = np.ascontiguousarray(np.tile(block, (reps, reps, 1))[:side, :side])
    return write_pyramidal_tiff(image, folder / "bench.tif", mpp=0.5)


def reader_version(reader: str) -> str:
    """``name version`` of the slide reader that opened the slide (OpenSlide: also the C library's)."""
    if reader == "openslide":
        import openslide

        return f"openslide-python {openslide.__version__} (libopenslide {openslide.__library_version__})"
    import tiffslide

    return f"tiffslide {tiffslide.__version__}"


def append_row(out: Path, row: dict) -> Path:
    """Append ``row`` to ``out``; a file with another header is kept and the row goes to a sibling file."""
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.exists():
        with open(out, newline="") as f:
            header = next(csv.reader(f), [])
        if header != list(row):
            digest = hashlib.sha1(",".join(row).encode()).hexdigest()[:8]
            out = out.with_name(f"{out.stem}-{digest}{out.suffix}")
    new = not out.exists()
    with open(out, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(row))
        if new:
            writer.writeheader()
        writer.writerow(row)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiles", type=int, default=20000)
    parser.add_argument("--tile-size", type=int, default=64)
    parser.add_argument("--backbone", default="test_convnext")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--reader", default="auto")
    parser.add_argument("--out", default="benchmarks/results/wsi_bench.csv")
    args = parser.parse_args()

    from zoo.data.wsi import open_slide
    from zoo.tools.bench import device_name
    from zoo.train.wsi_extract import extract_features

    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        slide = build_slide(Path(tmp), args.tiles, args.tile_size)
        write_s = time.perf_counter() - t0
        with open_slide(slide, args.reader) as opened:
            reader = opened.reader
        report = extract_features(
            [slide], Path(tmp) / "features", args.backbone, random_weights=True, tile_size=args.tile_size, mpp=0.5,
            min_tissue=0.0, batch_size=args.batch_size, device=args.device, reader=args.reader, progress=False,
        )  # fmt: skip
    print(f"slide written in {write_s:.1f} s")
    print(report.summary())
    if report.failed or not report.tiles:
        raise SystemExit(f"extraction failed, no row written:\n{report.summary()}")
    row = dict(
        date=datetime.datetime.now().isoformat(timespec="seconds"), machine=platform.node(),
        device=device_name(torch.device(args.device)), cpu_cores=os.cpu_count(), load_1m_before=round(load_before, 2),
        load_1m_after=round(os.getloadavg()[0], 2), python=platform.python_version(),
        torch=torch.__version__, reader=reader_version(reader), backbone=args.backbone, batch_size=args.batch_size,
        tile_size=args.tile_size, tiles=report.tiles, wall_s=round(report.wall_s, 2),
        tiles_per_s=round(report.tiles_per_s, 1), read_s=round(report.read_s, 2), embed_s=round(report.embed_s, 2),
        read_share=round(report.read_s / max(report.read_s + report.embed_s, 1e-9), 3), slide_write_s=round(write_s, 2),
    )  # fmt: skip
    print(f"wrote {append_row(Path(args.out), row)}")
    print(row)


if __name__ == "__main__":
    main()
