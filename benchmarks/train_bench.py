"""Training throughput under zoo.train's step (timm optimizer, autocast, GradScaler), models side by side.

    python benchmarks/train_bench.py --models biformer_tiny swin_tiny_patch4_window7_224 --batch-size 128 \
        --amp bf16 --device cuda --out benchmarks/results/train_gpu.csv

Inputs are random tensors already on the device (this measures the model + optimizer step, not data
loading; the loop itself reports the data-loading share of step time as ``data_time_frac`` in metrics.csv).
Rows: model, device, dtype, batch, img/s, ms/step, peak MiB.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import time
from pathlib import Path

import torch
from timm.optim import create_optimizer_v2

import zoo


def bench_model(name: str, batch: int, img_size: int, steps: int, warmup: int, amp: str, device: str) -> dict:
    dev = torch.device(device)
    model = zoo.create_model(name, num_classes=1000).to(dev).train()
    opt = create_optimizer_v2(model, opt="adamw", lr=1e-3, weight_decay=0.05)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)
    autocast = (lambda: torch.autocast(dev.type, dtype=dtype)) if dtype else contextlib.nullcontext
    scaler = torch.amp.GradScaler(dev.type, enabled=amp == "fp16")
    x = torch.randn(batch, 3, img_size, img_size, device=dev)
    y = torch.randint(0, 1000, (batch,), device=dev)
    loss_fn = torch.nn.CrossEntropyLoss()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()

    def step() -> None:
        with autocast():
            loss = loss_fn(model(x), y)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)

    for _ in range(warmup):
        step()
    if dev.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    if dev.type == "cuda":
        torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / steps
    peak = torch.cuda.max_memory_allocated() / 2**20 if dev.type == "cuda" else float("nan")
    return dict(model=name, device=str(dev), dtype=amp, batch=batch, img_s=round(batch / dt, 1),
                ms_step=round(1000 * dt, 2), peak_mib=round(peak, 1))  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["biformer_tiny", "swin_tiny_patch4_window7_224"])
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--amp", default="bf16", choices=["none", "bf16", "fp16"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default=None, help="CSV to append rows to")
    args = p.parse_args()
    rows = [
        bench_model(m, args.batch_size, args.img_size, args.steps, args.warmup, args.amp, args.device)
        for m in args.models
    ]
    for r in rows:
        print(r, flush=True)
    if args.out:
        path = Path(args.out)
        path.parent.mkdir(parents=True, exist_ok=True)
        new = not path.exists()
        with open(path, "a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            if new:
                w.writeheader()
            w.writerows(rows)


if __name__ == "__main__":
    main()
