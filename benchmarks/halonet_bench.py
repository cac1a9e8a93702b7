"""zoo's halonet50ts vs timm's halonet50ts: same weights, same process, interleaved.

The peer is ``timm.create_model('halonet50ts')`` (timm's ``HaloAttn``: unfolded K/V windows); ours is
``zoo.create_model('halonet50ts')`` with timm's state dict loaded strictly (``zoo.ops.halo_attention``: the
fused Triton kernel on CUDA, the PyTorch path with recompute-in-backward elsewhere). Before timing, the two
outputs are compared (they must agree: same numerics at multiples of 256).

* inference time: eval, ``no_grad``, calls interleaved (ours, peer, peer, ours, ...), median per model and the
  median of the per-round ratios (robust to load drift on a shared machine);
* peak training memory: one forward + backward in train mode (after a warm-up step), measured with
  ``zoo.tools.memory.track_peak_memory`` (CUDA allocator peak; on CPU a dispatch-level tensor tracker);
* training-step time (forward + backward), interleaved like inference; on CUDA reported as img/s.

Targets (issue 5): CPU batch 8 at 256: inference <= 1.0x, peak training memory <= 0.7x;
GPU bf16 batch 128 at 256: training throughput >= 1.5x.

    python benchmarks/halonet_bench.py                                  # CPU, batch 8, 256, fp32
    python benchmarks/halonet_bench.py --device cuda                    # bf16, batch 128, 256
    python benchmarks/halonet_bench.py --iters 3 --warmup 1 --out /tmp  # quick

Prints ratios (ours / peer for time and memory, ours / peer for img/s) and writes a CSV named after the model,
device, torch version and date into ``--out`` (default ``benchmarks/results/``). Timings never go in tests.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import timm
import torch

import zoo
import zoo.models.halonet  # noqa: F401  (registers the family until zoo.models imports it)
from zoo.tools.bench import autocast_for, device_name, sync
from zoo.tools.memory import track_peak_memory


def _interleaved(
    fns: dict[str, Callable[[], None]], device: torch.device, warmup: int, iters: int
) -> tuple[dict[str, float], float]:
    """Median seconds per call of each fn and the median per-round ratio ours/peer; the order alternates each
    round so that a drifting load (shared machine, clocks) hits both alike."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for i in range(warmup + iters):
        order = list(fns) if i % 2 == 0 else list(fns)[::-1]
        for key in order:
            sync(device)
            start = time.perf_counter()
            fns[key]()
            sync(device)
            if i >= warmup:
                times[key].append(time.perf_counter() - start)
    ratio = statistics.median(o / p for o, p in zip(times["ours"], times["peer"]))
    return {k: statistics.median(v) for k, v in times.items()}, ratio


def _train_step(model: torch.nn.Module, x: torch.Tensor, device: torch.device, amp: str) -> None:
    model.zero_grad(set_to_none=True)
    with autocast_for(device, amp):
        loss = model(x).float().logsumexp(-1).mean()
    loss.backward()


def _peak_train_bytes(model: torch.nn.Module, x: torch.Tensor, device: torch.device, amp: str) -> int:
    """Bytes above the level at entry at the peak of one training step (after a warm-up step)."""
    model.train()
    _train_step(model, x, device, amp)  # warm-up: lazily allocated state is not the step's memory
    model.zero_grad(set_to_none=True)
    with track_peak_memory(device) as peak:
        _train_step(model, x, device, amp)
    model.zero_grad(set_to_none=True)
    return peak.peak_bytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="halonet50ts", help="a halo model that timm and zoo both have")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--batch", type=int, default=None, help="batch (default 8 on CPU, 128 on CUDA)")
    parser.add_argument("--img-size", type=int, default=256, help="square input side (timm needs a multiple of 256)")
    parser.add_argument("--amp", default=None, choices=("none", "bf16", "fp16"), help="autocast (default bf16 on CUDA)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds")
    parser.add_argument("--iters", type=int, default=5, help="timed rounds (one call of each model per round)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    parser.add_argument("--skip-train-time", action="store_true", help="CPU: skip the training-step timing")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"), help="folder for the CSV")
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    batch = args.batch or (128 if device.type == "cuda" else 8)
    amp = args.amp or ("bf16" if device.type == "cuda" else "none")

    torch.manual_seed(0)
    peer = timm.create_model(args.model).to(device).eval()
    ours = zoo.create_model(args.model).to(device).eval()
    ours.load_state_dict(peer.state_dict(), strict=True)
    x = torch.randn(batch, 3, args.img_size, args.img_size, device=device)
    with torch.no_grad(), autocast_for(device, amp):
        max_diff = (ours(x[:2]).float() - peer(x[:2]).float()).abs().max().item()

    meta = dict(
        date=dt.datetime.now().isoformat(timespec="seconds"),
        device=device_name(device),
        torch=torch.__version__,
        timm=timm.__version__,
        model=args.model,
        img_size=args.img_size,
        batch=batch,
        amp=amp,
        iters=args.iters,
    )
    rows = []

    def infer(model: torch.nn.Module) -> Callable[[], None]:
        def run() -> None:
            with torch.no_grad(), autocast_for(device, amp):
                model(x)

        return run

    t, ratio = _interleaved({"ours": infer(ours), "peer": infer(peer)}, device, args.warmup, args.iters)
    rows.append(dict(meta, metric="infer_s_per_batch", ours=t["ours"], peer=t["peer"], ratio=ratio, target="<= 1.0"))

    if device.type == "cuda" or not args.skip_train_time:
        ours.train(), peer.train()
        t, ratio = _interleaved(
            {"ours": lambda: _train_step(ours, x, device, amp), "peer": lambda: _train_step(peer, x, device, amp)},
            device,
            args.warmup,
            args.iters,
        )
        rows.append(dict(meta, metric="train_s_per_step", ours=t["ours"], peer=t["peer"], ratio=ratio, target=""))
        rows.append(
            dict(
                meta, metric="train_img_per_s", ours=batch / t["ours"], peer=batch / t["peer"], ratio=1 / ratio,
                target=">= 1.5 (GPU bf16, batch 128)",
            )
        )  # fmt: skip

    mem = {}
    for key, model in (("peer", peer), ("ours", ours)):
        if device.type == "cuda":
            torch.cuda.empty_cache()
        mem[key] = _peak_train_bytes(model, x, device, amp)
    rows.append(
        dict(
            meta, metric="train_peak_MiB", ours=mem["ours"] / 2**20, peer=mem["peer"] / 2**20,
            ratio=mem["ours"] / mem["peer"], target="<= 0.7",
        )
    )  # fmt: skip

    print(f"{args.model} on {meta['device']}, torch {meta['torch']}, timm {meta['timm']}, batch {batch}, "
          f"{args.img_size}px, amp {amp}; max |ours - peer| on the logits: {max_diff:.2e}")  # fmt: skip
    print(f"{'metric':<20} {'ours':>12} {'peer (timm)':>12} {'ours/peer':>10}  target")
    for row in rows:
        print(f"{row['metric']:<20} {row['ours']:>12.4f} {row['peer']:>12.4f} {row['ratio']:>10.3f}  {row['target']}")

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    tag = "cuda" if device.type == "cuda" else "cpu"
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    path = out_dir / f"halonet_bench-{args.model}-{tag}-pt{torch.__version__.split('+')[0]}-{stamp}.csv"
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
