"""BiFormer on zoo's routed-attention backends vs the original gather formulation, one model, two backends.

The peer is the same ``biformer_tiny`` (same weights) with ``attn_backend="torch"``: the reference backend of
``zoo.ops.routed_attention``, i.e. the original BiFormer gather formulation (K/V copied ``topk`` times). Ours is
the backend the dispatch picks (``torch_lean`` on CPU, ``triton`` on CUDA) unless ``--ours`` names one.

* inference time: eval, ``no_grad``, interleaved (ours, peer, ours, ...) in this process, median per backend;
* peak training memory: one forward + backward in train mode; on CUDA ``max_memory_allocated``, on CPU the
  peak resident set (``VmHWM`` after ``clear_refs``) above the resident set before the step, each backend in a
  fresh subprocess (a process-wide peak cannot be shared);
* on CUDA also training-step throughput, and img/s of timm peers (``--peers``) in the same run.

Prints ratios (ours / peer for times and memory, ours / peer for img/s) and writes a CSV with the device,
torch version and date to ``--out`` (a folder, default ``benchmarks/results/``). Timings never go in tests.

    python benchmarks/biformer_bench.py                      # CPU, batch 8, 224
    python benchmarks/biformer_bench.py --device cuda --amp bf16 --batch 128 --train-batch 128
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

import zoo
import zoo.models.biformer  # noqa: F401  (registers the family until zoo.models imports it)
import zoo.ops
from zoo.tools.bench import autocast_for, device_name, sync

PEER = "torch"  # the original gather formulation


def _build(name: str, device: torch.device, backend: str | None) -> torch.nn.Module:
    torch.manual_seed(0)
    return zoo.create_model(name, attn_backend=backend).to(device)


def _time_interleaved(fns: dict[str, callable], device: torch.device, warmup: int, iters: int) -> dict[str, float]:
    """Median seconds per call of each fn, calls interleaved so that load drifts hit every fn alike."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for i in range(warmup + iters):
        for key, fn in fns.items():
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            if i >= warmup:
                times[key].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in times.items()}


def _rss_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _train_step(model: torch.nn.Module, x: torch.Tensor, device: torch.device, amp: str) -> None:
    model.zero_grad(set_to_none=True)
    with autocast_for(device, amp):
        loss = model(x).float().logsumexp(-1).mean()
    loss.backward()


def peak_train_memory(name: str, backend: str | None, device: torch.device, batch: int, size: int, amp: str) -> int:
    """Bytes above the pre-step level at the peak of one training step (after one warm-up step)."""
    model = _build(name, device, backend).train()
    x = torch.randn(batch, 3, size, size, device=device)
    _train_step(model, x, device, amp)  # warm-up: one-time buffers are not the step's memory
    model.zero_grad(set_to_none=True)
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        _train_step(model, x, device, amp)
        sync(device)
        return torch.cuda.max_memory_allocated(device) - base
    Path("/proc/self/clear_refs").write_text("5")  # reset the resident-set high-water mark (Linux)
    base = _rss_bytes("VmRSS")
    _train_step(model, x, device, amp)
    return _rss_bytes("VmHWM") - base


def _memory_in_subprocess(args: argparse.Namespace, backend: str | None) -> int:
    cmd = [sys.executable, __file__, "--_memory-child", backend or "auto", "--model", args.model]
    cmd += ["--device", args.device, "--train-batch", str(args.train_batch), "--img-size", str(args.img_size)]
    cmd += ["--amp", args.amp]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])["peak_bytes"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="biformer_tiny", help="biformer variant")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--batch", type=int, default=8, help="inference batch")
    parser.add_argument("--train-batch", type=int, default=8, help="training-step batch (memory, throughput)")
    parser.add_argument("--img-size", type=int, default=224, help="square input side")
    parser.add_argument("--amp", default="none", choices=("none", "bf16", "fp16"), help="autocast dtype")
    parser.add_argument("--ours", default=None, help="routed_attention backend for ours (default: the dispatch's)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls per backend")
    parser.add_argument("--iters", type=int, default=6, help="timed calls per backend")
    parser.add_argument("--peers", default=None, help="comma-separated timm models for img/s (default on cuda)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"), help="folder for the CSV")
    parser.add_argument("--_memory-child", dest="memory_child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    device = torch.device(args.device)

    if args.memory_child is not None:  # subprocess: one backend's peak training memory, as JSON
        backend = None if args.memory_child == "auto" else args.memory_child
        peak = peak_train_memory(args.model, backend, device, args.train_batch, args.img_size, args.amp)
        print(json.dumps({"peak_bytes": peak}))
        return

    ours_model = _build(args.model, device, args.ours).eval()
    peer_model = _build(args.model, device, PEER).eval()
    x = torch.randn(args.batch, 3, args.img_size, args.img_size, device=device)
    with torch.no_grad():
        problem_backend = _ours_backend_name(ours_model, x)
    rows = []
    meta = dict(
        date=dt.datetime.now().isoformat(timespec="seconds"),
        device=device_name(device),
        torch=torch.__version__,
        model=args.model,
        img_size=args.img_size,
        amp=args.amp,
        ours=problem_backend,
        peer=f"{PEER} (gather)",
    )

    def infer(model):
        def run():
            with torch.no_grad(), autocast_for(device, args.amp):
                model(x)

        return run

    t = _time_interleaved({"ours": infer(ours_model), "peer": infer(peer_model)}, device, args.warmup, args.iters)
    rows.append(dict(meta, metric="infer_s_per_batch", batch=args.batch, ours_value=t["ours"], peer_value=t["peer"]))

    if device.type == "cuda":
        xt = torch.randn(args.train_batch, 3, args.img_size, args.img_size, device=device)
        ours_model.train(), peer_model.train()
        t = _time_interleaved(
            {
                "ours": lambda: _train_step(ours_model, xt, device, args.amp),
                "peer": lambda: _train_step(peer_model, xt, device, args.amp),
            },
            device,
            args.warmup,
            args.iters,
        )
        rows.append(
            dict(meta, metric="train_s_per_step", batch=args.train_batch, ours_value=t["ours"], peer_value=t["peer"])
        )
        del ours_model, peer_model
        torch.cuda.empty_cache()
        mem = {k: peak_train_memory(args.model, b, device, args.train_batch, args.img_size, args.amp)
               for k, b in (("ours", args.ours), ("peer", PEER))}  # fmt: skip
    else:
        del ours_model, peer_model
        mem = {"ours": _memory_in_subprocess(args, args.ours), "peer": _memory_in_subprocess(args, PEER)}
    rows.append(
        dict(meta, metric="train_peak_bytes", batch=args.train_batch, ours_value=mem["ours"], peer_value=mem["peer"])
    )

    peers = (
        args.peers.split(",")
        if args.peers
        else (["swin_tiny_patch4_window7_224", "davit_tiny"] if device.type == "cuda" else [])
    )
    if peers:
        fns = {name: infer(zoo.create_model(name).to(device).eval()) for name in peers}
        fns[args.model] = infer(_build(args.model, device, args.ours).eval())
        t = _time_interleaved(fns, device, args.warmup, args.iters)
        for name in peers:
            rows.append(
                dict(meta, metric=f"infer_img_per_s_vs_{name}", batch=args.batch, ours_value=args.batch / t[args.model],
                     peer_value=args.batch / t[name])
            )  # fmt: skip

    for row in rows:
        row["ratio_ours_over_peer"] = row["ours_value"] / row["peer_value"]
        print(f"{row['metric']:>40}: ours {row['ours_value']:.4g}  peer {row['peer_value']:.4g}  "
              f"ratio {row['ratio_ours_over_peer']:.3f}")  # fmt: skip
    print(f"device: {meta['device']}  torch {meta['torch']}  ours: {problem_backend}  peer: {meta['peer']}")

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    path = out_dir / f"biformer_bench-{args.model}-{device.type}-{stamp}.csv"
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {path}")


def _ours_backend_name(model: torch.nn.Module, x: torch.Tensor) -> str:
    """The routed_attention backend the dispatch picks for the first BRA of ``model`` on input ``x``."""
    from zoo.models.biformer import BiLevelRoutingAttention

    bra = next(m for m in model.modules() if isinstance(m, BiLevelRoutingAttention))
    feat = model.stem(x[:1]).permute(0, 2, 3, 1)
    B, H, W, C = feat.shape
    S = bra.n_win
    rh, rw = -(-H // S), -(-W // S)
    q = torch.zeros(B, bra.num_heads, rh * S, rw * S, C // bra.num_heads, device=x.device, dtype=x.dtype)
    idx = torch.zeros(B, S * S, bra.topk, dtype=torch.long, device=x.device)
    return zoo.ops.select_routed_backend(q, q, q, idx, (rh, rw), bra.scale, backend=bra.attn_backend or "auto")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    main()
