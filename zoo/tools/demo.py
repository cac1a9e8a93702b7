"""``make demo`` until the training entry point lands: a tour of what zoo does end to end, offline.

It says plainly what it does: it lists the registry, builds each family's smallest backbone and reports
its measured parameters and GMACs, extracts multi-scale features, writes an export folder and reads it
back with timm's own ``local-dir:`` loader (outputs compared bit for bit), and times zoo's backbones
against timm peers in one process. No weights are downloaded: models are randomly initialised.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import timm
import torch

import zoo
from zoo.tools.bench import benchmark_models
from zoo.tools.export import export_model
from zoo.tools.info import model_info

__all__ = ["run_demo"]


def _param_count(name: str) -> int:
    try:  # timm-style families thread device=; a meta build costs no memory and no init time
        model = zoo.create_model(name, device="meta")
    except TypeError:
        model = zoo.create_model(name)
    return sum(p.numel() for p in model.parameters())


def _smallest_backbone_per_family() -> list[str]:
    chosen: dict[str, tuple[int, str]] = {}
    for name in zoo.list_models(kind="backbone", exclude_filters=["*large*", "*huge*", "*giant*", "*_fl"]):
        family = zoo._registry.get_entry(name).module
        params = _param_count(name)
        if family not in chosen or params < chosen[family][0]:
            chosen[family] = (params, name)
    return [name for _, name in chosen.values()]


def run_demo(bench_iters: int = 3) -> None:
    print("zoo demo:", " ".join(__doc__.split("\n\n")[1].split()), "\n")
    names = zoo.list_models()
    print(f"zoo {zoo.__version__}: {len(names)} architectures; kinds {zoo.list_kinds()}")
    for kind in zoo.list_kinds():
        listed = zoo.list_models(kind=kind)
        print(f"  {kind:9s} {len(listed):3d}  {', '.join(listed[:8])}{' ...' if len(listed) > 8 else ''}")

    backbones = _smallest_backbone_per_family()
    print("\nsmallest backbone of each family (random init, measured here):")
    for name in backbones:
        info = model_info(name)
        levels = ", ".join(f"{f['num_chs']}@/{f['reduction']}" for f in info.feature_info)
        print(f"  {name:24s} {info.params / 1e6:6.2f} M params  {info.gmacs:5.2f} GMACs  features {levels}")

    x = torch.randn(2, 3, 160, 208)
    with tempfile.TemporaryDirectory() as tmp:
        for name in backbones:
            model = zoo.create_model(name, num_classes=10).eval()
            features = zoo.create_model(name, features_only=True).eval()
            with torch.no_grad():
                shapes = [tuple(f.shape[1:]) for f in features(x)]
                out_dir = export_model(model, Path(tmp) / name)
                reloaded = timm.create_model(f"local-dir:{out_dir}", pretrained=True).eval()
                same = torch.equal(model(x), reloaded(x))
            print(f"\n{name}: features at 160x208 {shapes}")
            print(
                f"  exported to {out_dir.name}/ (model.safetensors + config.json); "
                f"timm local-dir reload identical: {same}"
            )

    peers = ["resnet50", "swin_tiny_patch4_window7_224"]
    print(f"\ntiming (CPU, batch 4, 224 px, {bench_iters} interleaved rounds; ratios to {peers[0]}):")
    rows = benchmark_models(backbones, peers, batch_size=4, img_size=224, iters=bench_iters, train=True)
    for r in rows:
        print(
            f"  {r.model:30s} infer {r.infer_img_s:6.1f} img/s (x{r.infer_time_ratio:.2f} time)  "
            f"train {r.train_img_s:6.1f} img/s (x{r.train_time_ratio:.2f})  peak {r.train_peak_mib:7.1f} MiB"
        )
    print("\nDone. Training on the embedded data arrives with `zoo train` (see the README).")
