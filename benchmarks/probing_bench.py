"""EP vs the multi-head attentive probe (q/k/v/o) at ViT-B width: trainable parameters and training step.

Same batch of frozen tokens (B, N, 768), same classifier width, one process, steps interleaved round-robin
(EP, peer, EP, peer, ...) so that load changes on a shared machine hit both alike. Prints ratios
(ours / peer) and, with ``--out``, appends rows to a CSV (device, torch version, date).

Parameters are counted two ways: ``params_ratio`` on the whole probe (pool + BatchNorm + classifier), which
is how the EP paper counts "trainable parameters" (EP ViT-B, C = 1000, Q = 32: 1,383,400) and what the
issue's target (<= 1/3) refers to; ``pool_params_ratio`` on the pooling alone. The target's peer is
``attentive_probe`` (q/k/v/o + MLP, SigLIP MAP / timm ``AttentionPoolLatent``); ``vjepa_probe``,
``mha_probe`` (q/k/v/o without MLP) and ``aim_probe`` (W_k / W_v only) are reported alongside.

    python benchmarks/probing_bench.py --out benchmarks/results/probing_cpu.csv
"""

from __future__ import annotations

import argparse
import csv
import datetime
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import zoo
import zoo.heads.probing  # noqa: F401  (registers the probes until zoo.heads imports them)


def _step(model: torch.nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> None:
    loss = F.cross_entropy(model(x), y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=196, help="patch tokens (ViT-B/16 at 224: 196)")
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--iters", type=int, default=10, help="timed rounds")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    parser.add_argument("--peers", nargs="+", default=["attentive_probe", "vjepa_probe", "mha_probe", "aim_probe"])
    parser.add_argument("--out", default=None, help="CSV file to append rows to")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    x = torch.randn(args.batch_size, args.tokens, args.dim)
    y = torch.randint(0, args.classes, (args.batch_size,))
    names = ["efficient_probe", *args.peers]
    models = {n: zoo.create_model(n, embed_dim=args.dim, num_classes=args.classes).train() for n in names}
    opts = {n: torch.optim.AdamW(m.parameters(), lr=1e-3) for n, m in models.items()}
    times: dict[str, list[float]] = {n: [] for n in names}
    for it in range(args.warmup + args.iters):
        for n in names:  # interleaved: one step of each per round
            t0 = time.perf_counter()
            _step(models[n], opts[n], x, y)
            if it >= args.warmup:
                times[n].append(time.perf_counter() - t0)
    ours = names[0]
    rows = []
    device = f"cpu {platform.processor() or platform.machine()} x{torch.get_num_threads()} threads"
    for n in names:
        params = sum(p.numel() for p in models[n].parameters() if p.requires_grad)
        pool = models[n].pool_parameters()
        step = statistics.median(times[n])
        rows.append(dict(probe=n, trainable_params=params, pool_params=pool, step_ms=1e3 * step))
    base = rows[0]
    print(f"batch {args.batch_size} x {args.tokens} tokens x {args.dim}, {args.classes} classes; {device}")
    for r in rows:
        r["params_ratio"] = base["trainable_params"] / r["trainable_params"]
        r["pool_params_ratio"] = base["pool_params"] / r["pool_params"] if r["pool_params"] else float("nan")
        r["speedup"] = r["step_ms"] / base["step_ms"]  # how many times faster ours is than this peer
        print(
            f"{r['probe']:18s} trainable {r['trainable_params']:>10,} (pool {r['pool_params']:>10,})  "
            f"step {r['step_ms']:8.1f} ms   {ours}/peer params {r['params_ratio']:.3f} "
            f"(pool {r['pool_params_ratio']:.3f})   {ours} speed-up x{r['speedup']:.2f}"
        )
    target = "attentive_probe"
    for r in rows:
        if r["probe"] == target:
            verdict = lambda ok: "met" if ok else "NOT met"  # noqa: E731
            print(
                f"target vs {target}: params <= 1/3 whole probe {r['params_ratio']:.3f} "
                f"{verdict(r['params_ratio'] <= 1 / 3)}, pooling alone {r['pool_params_ratio']:.3f} "
                f"{verdict(r['pool_params_ratio'] <= 1 / 3)}; "
                f"step >= 3x x{r['speedup']:.2f} {verdict(r['speedup'] >= 3)}"
            )
    if args.out:
        path = Path(args.out)
        path.parent.mkdir(parents=True, exist_ok=True)
        new = not path.is_file()
        stamp = datetime.datetime.now().isoformat(timespec="seconds")
        with open(path, "a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["date", "device", "torch", "batch", "tokens", "dim", *rows[0]])
            if new:
                writer.writeheader()
            for r in rows:
                writer.writerow(dict(date=stamp, device=device, torch=torch.__version__, batch=args.batch_size,
                                     tokens=args.tokens, dim=args.dim, **r))  # fmt: skip


if __name__ == "__main__":
    main()
