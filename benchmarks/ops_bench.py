"""Benchmark zoo.ops routed and halo attention against their peers, in one process, interleaved.

Routed attention (BiFormer-T at 224: stages 1-3, n_win 7, head dim 32): the gather reference (the original
formulation, ``torch``), the lean torch path, the Triton kernels, FlexAttention, zoo's dense backend
(``sdpa_dense``: SDPA with a routing bias, what ``auto`` picks on CUDA for small regions), and dense SDPA with a
boolean routing mask in region-major order (``sdpa_dense_mask``). Halo attention (HaloNet-50ts halo layers at
256, block 8, halo 3): timm's ``HaloAttn`` layer against the same layer with its attention core replaced by
``zoo.ops.halo_attention`` (torch reference and Triton, with both dk/dv strategies of its backward: backends
``triton`` and ``triton_key_blocks``).

For every (shape, batch, mode) the peers run in rotating order for ``--rounds`` rounds (``--iters`` calls each);
the median per-call time, the ratio to the reference, the peak memory of one call, and (on GPU) the achieved
bytes/s and fraction of the memory-bandwidth floor are printed and written to ``<out>/ops_<device>.csv`` with the
device, dtype, torch and triton versions and the date. On CUDA, ``--graphs`` also times each peer as a CUDA graph
replay (``graph_ms``): the device time alone, without the Python and launch overhead that bounds small calls.

    python benchmarks/ops_bench.py --device cpu --batch 8 --rounds 5          # CPU target (lean vs reference)
    python benchmarks/ops_bench.py --device cuda --dtype bfloat16 --batch 1 32 128 --out benchmarks/results
"""

from __future__ import annotations

import argparse
import csv
import datetime
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import zoo.ops as ops  # noqa: E402
from zoo.ops._common import from_regions, to_regions  # noqa: E402
from zoo.ops.reference import routed_attention_reference  # noqa: E402

# (name, map side, heads, region side, topk): BiFormer-T at 224, n_win 7, head dim 32
ROUTED_STAGES = [("biformer_t_s1", 56, 2, 8, 1), ("biformer_t_s2", 28, 4, 4, 4), ("biformer_t_s3", 14, 8, 2, 16)]
# (name, map side, in channels, heads, head dim): HaloNet-50ts halo layers at 256, block 8, halo 3
HALO_LAYERS = [
    ("halonet50ts_s2", 32, 128, 4, 32),
    ("halonet50ts_s3", 16, 256, 8, 32),
    ("halonet50ts_s4", 8, 512, 8, 64),
]
# measured HBM bandwidth (specs/performance.md) by device-name fragment, bytes/s
BANDWIDTH = {"H100": 3.0e12, "H200": 4.3e12}


@dataclass
class Peer:
    name: str
    fn: Callable[[], object]  # one call (forward, or forward + backward)
    reason: str | None = None  # why it cannot run here (then fn is unused)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def peak_memory(fn: Callable[[], object], device: str) -> float:
    """Peak bytes allocated during one call, above what was allocated before it."""
    if device == "cuda":
        sync(device)
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        sync(device)
        return torch.cuda.max_memory_allocated() - base
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    current = peak = 0
    for _, nbytes in events:
        current += nbytes
        peak = max(peak, current)
    return float(peak)


def time_interleaved(peers: list[Peer], device: str, rounds: int, iters: int) -> dict[str, float]:
    """Median seconds per call, peers in rotating order each round (load drifts hit every peer alike)."""
    for p in peers:  # warm-up: compilation, autotuning, allocator; a peer that fails is reported, not fatal
        if p.reason is None:
            try:
                p.fn()
                sync(device)
            except Exception as err:  # noqa: BLE001
                p.reason = f"failed: {type(err).__name__}: {str(err).splitlines()[0][:200]}"
    runnable = [p for p in peers if p.reason is None]
    samples: dict[str, list[float]] = {p.name: [] for p in runnable}
    for r in range(rounds):
        order = runnable[r % len(runnable) :] + runnable[: r % len(runnable)]
        for p in order:
            sync(device)
            start = time.perf_counter()
            for _ in range(iters):
                p.fn()
            sync(device)
            samples[p.name].append((time.perf_counter() - start) / iters)
    return {name: statistics.median(values) for name, values in samples.items()}


def time_graph(peer: Peer, iters: int) -> float | str:
    """Median seconds per CUDA-graph replay of ``peer.fn`` (device time only), or why it cannot be captured."""
    try:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up on a side stream, as capture requires
            peer.fn()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            peer.fn()
        graph.replay()
        torch.cuda.synchronize()
    except Exception as err:  # noqa: BLE001 - report, do not crash the benchmark
        torch.cuda.synchronize()
        return f"graph capture failed: {type(err).__name__}: {str(err).splitlines()[0][:120]}"
    samples = []
    for _ in range(5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            graph.replay()
        end.record()
        torch.cuda.synchronize()
        samples.append(start.elapsed_time(end) / 1e3 / iters)
    del graph
    return statistics.median(samples)


def support_reason(backend: str, q, k, v, idx, region: int, scale: float) -> str | None:
    try:
        return ops.backend_support("routed_attention", q, k, v, idx, region, scale)[backend]
    except Exception as err:  # noqa: BLE001 - report, do not crash the benchmark
        return str(err)


def dense_sdpa_peer(q, k, v, idx, region: int, scale: float):
    """Dense SDPA over all tokens with a boolean routing mask (tokens in region-major order)."""
    B, nh, H, W, d = q.shape
    T = region * region
    R = (H // region) * (W // region)
    routed = torch.zeros(B, R, R, dtype=torch.bool, device=q.device).scatter_(-1, idx, True)
    mask = routed.repeat_interleave(T, 1).repeat_interleave(T, 2)[:, None]  # (B, 1, N, N)

    def call(q, k, v):
        q_s, k_s, v_s = (to_regions(t, region, region).flatten(2, 3) for t in (q, k, v))
        out = torch.nn.functional.scaled_dot_product_attention(q_s, k_s, v_s, attn_mask=mask, scale=scale)
        return from_regions(out.view(B, nh, R, T, -1), H, W, region, region)

    return call


def routed_peers(batch: int, stage, device: str, dtype: torch.dtype, backward: bool) -> tuple[list[Peer], float]:
    name, side, heads, region, topk = stage
    d = 32
    g = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(batch, heads, side, side, d, device=device, dtype=dtype, generator=g) for _ in range(3))
    R = (side // region) ** 2
    q_region = to_regions(q.float().mean(1, keepdim=True), region, region).mean(-2)[:, 0]
    k_region = to_regions(k.float().mean(1, keepdim=True), region, region).mean(-2)[:, 0]
    idx = ops.region_routing(q_region, k_region, min(topk, R))
    scale = (heads * d) ** -0.5  # BiFormer's quirk: the whole qk width
    grad_out = torch.randn_like(q)
    leaves = [t.detach().requires_grad_(backward) for t in (q, k, v)]

    def make(fn: Callable) -> Callable[[], object]:
        def call():
            if backward:
                for t in leaves:
                    t.grad = None
                fn(*leaves).backward(grad_out)
                return None
            with torch.no_grad():
                return fn(*leaves)

        return call

    peers = [Peer("torch", make(lambda q, k, v: routed_attention_reference(q, k, v, idx, (region, region), scale)))]
    for backend in ["torch_lean", "triton", "flex", "sdpa_dense"]:
        if backend == "triton" and device == "cpu":
            peers.append(Peer(backend, lambda: None, "the Triton interpreter is not a benchmark"))
            continue
        if backend == "sdpa_dense" and device == "cpu" and side * side > 1024:
            peers.append(Peer(backend, lambda: None, "dense N x N scores are too large for a CPU run"))
            continue
        with torch.set_grad_enabled(backward):
            probe = [t.detach().requires_grad_(backward) for t in (q, k, v)]
            reason = support_reason(backend, *probe, idx, region, scale)
        fn = lambda q, k, v, b=backend: ops.routed_attention(q, k, v, idx, region, scale, backend=b)
        peers.append(Peer(backend, make(fn), reason))
    too_big = "dense N x N scores are too large for a CPU run" if device == "cpu" and side * side > 1024 else None
    peers.append(Peer("sdpa_dense_mask", make(dense_sdpa_peer(q, k, v, idx, region, scale)), too_big))
    # memory floor: read q, k, v and write o once (+ read dO, o and write dq, dk, dv for the backward)
    elements = q.numel() * (4 if not backward else 9)
    return peers, elements * q.element_size()


def halo_peers(batch: int, layer, device: str, dtype: torch.dtype, backward: bool) -> tuple[list[Peer], float]:
    from timm.layers.halo_attn import HaloAttn

    name, side, channels, heads, dim_head = layer
    torch.manual_seed(0)
    attn = HaloAttn(channels, channels, num_heads=heads, dim_head=dim_head, block_size=8, halo_size=3).to(device, dtype)
    x = torch.randn(batch, channels, side, side, device=device, dtype=dtype, requires_grad=backward)

    def zoo_layer(backend: str) -> Callable:
        def forward(x):
            B, _, H, W = x.shape
            dqk, dv = attn.dim_head_qk, attn.dim_head_v
            q = attn.q(x).view(B, heads, dqk, H, W).permute(0, 1, 3, 4, 2)
            kv = attn.kv(x).view(B, heads, dqk + dv, H, W)
            k, v = kv[:, :, :dqk].permute(0, 1, 3, 4, 2), kv[:, :, dqk:].permute(0, 1, 3, 4, 2)
            rel = (attn.pos_embed.height_rel, attn.pos_embed.width_rel)
            out = ops.halo_attention(q, k, v, 8, 3, rel, attn.scale, backend=backend)
            return out.permute(0, 1, 4, 2, 3).reshape(B, heads * dv, H, W)

        return forward

    def make(fn: Callable) -> Callable[[], object]:
        def call():
            if backward:
                x.grad = None
                attn.zero_grad(set_to_none=True)
                out = fn(x)
                out.backward(torch.ones_like(out))
                return None
            with torch.no_grad():
                return fn(x)

        return call

    peers = [Peer("timm_haloattn", make(attn)), Peer("torch", make(zoo_layer("torch")))]
    triton_reason = "the Triton interpreter is not a benchmark" if device == "cpu" else None
    peers.append(Peer("triton", make(zoo_layer("triton")), triton_reason))
    if backward:  # the other dk/dv strategy of the Triton backward: its own backend
        peers.append(Peer("triton_key_blocks", make(zoo_layer("triton_key_blocks")), triton_reason))
    elements = batch * heads * side * side * dim_head * (4 if not backward else 9)
    return peers, elements * x.element_size()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="float32/bfloat16/float16 (default: bf16 on cuda, fp32 on cpu)")
    parser.add_argument("--batch", type=int, nargs="+", default=None, help="default: 1 32 128 on cuda, 8 on cpu")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--iters", type=int, default=None, help="calls per round (default 20 on cuda, 1 on cpu)")
    parser.add_argument("--ops", nargs="+", default=["routed", "halo"], choices=["routed", "halo"])
    parser.add_argument("--modes", nargs="+", default=["fwd", "fwd_bwd"], choices=["fwd", "fwd_bwd"])
    parser.add_argument("--stages", nargs="+", default=None, help="subset of shape names (default: all)")
    parser.add_argument("--out", default="benchmarks/results", help="folder for the CSV")
    parser.add_argument("--tag", default=None, help="machine name in the CSV file name (default: device)")
    parser.add_argument("--bandwidth", type=float, default=None, help="memory bandwidth in bytes/s for the floor")
    parser.add_argument("--graphs", action="store_true", help="CUDA: also time CUDA-graph replays (device time)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    # one compiled Flex per (shape, batch, mode): stay under dynamo's recompile limit (else it falls back to eager)
    torch._dynamo.config.recompile_limit = max(64, torch._dynamo.config.recompile_limit)

    device = args.device
    dtype = getattr(torch, args.dtype or ("bfloat16" if device == "cuda" else "float32"))
    batches = args.batch or ([1, 32, 128] if device == "cuda" else [8])
    iters = args.iters or (20 if device == "cuda" else 1)
    if device == "cuda":
        device_name = torch.cuda.get_device_name()
        bandwidth = args.bandwidth or next((bw for key, bw in BANDWIDTH.items() if key in device_name), None)
    else:
        device_name = f"{platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"
        bandwidth = args.bandwidth
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "n/a"
    tag = args.tag or (device_name.replace(" ", "_") if device == "cuda" else f"cpu_{os.cpu_count()}core")
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path = out_dir / f"ops_{tag}.csv"
    date = datetime.datetime.now().isoformat(timespec="seconds")
    print(f"device {device_name}, {dtype}, torch {torch.__version__}, triton {triton_version}, batches {batches}")

    fields = [
        "op", "shape", "batch", "mode", "peer", "ms", "ratio_vs_reference", "peak_mb", "achieved_gbs",
        "floor_fraction", "graph_ms", "graph_ratio_vs_reference", "graph_floor_fraction", "note", "device", "dtype",
        "torch", "triton", "date",
    ]  # fmt: skip

    def write(rows: list[dict]) -> None:
        # rewritten after every case: a time-boxed run (make gpu-check) keeps what it measured
        with csv_path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fields)
            writer.writeheader()
            writer.writerows(rows)

    rows = []
    jobs = [("routed", s, routed_peers) for s in ROUTED_STAGES] + [("halo", s, halo_peers) for s in HALO_LAYERS]
    for batch in batches:  # batch-major, in the order given: the target batch first when time is short
        for op, shape, build in jobs:
            if op not in args.ops or (args.stages and shape[0] not in args.stages):
                continue
            for mode in args.modes:
                peers, floor_bytes = build(batch, shape, device, dtype, mode == "fwd_bwd")
                times = time_interleaved(peers, device, args.rounds, iters)
                ref_name = "torch" if op == "routed" else "timm_haloattn"
                base = times.get(ref_name)
                graph_times = {}
                if args.graphs and device == "cuda":
                    graph_times = {p.name: time_graph(p, iters) for p in peers if p.reason is None}
                graph_base = graph_times.get(ref_name)
                print(f"\n{op} {shape[0]} batch {batch} {mode} (floor {floor_bytes / 1e6:.1f} MB)", flush=True)
                for p in peers:
                    row = {
                        "op": op, "shape": shape[0], "batch": batch, "mode": mode, "peer": p.name,
                        "device": device_name, "dtype": str(dtype).replace("torch.", ""), "torch": torch.__version__,
                        "triton": triton_version, "date": date,
                    }  # fmt: skip
                    if p.reason is not None:
                        row["note"] = f"unsupported: {p.reason}"
                        print(f"  {p.name:16s} -- {p.reason}")
                    else:
                        seconds = times[p.name]
                        memory = peak_memory(p.fn, device)
                        row.update(
                            ms=round(seconds * 1e3, 4),
                            ratio_vs_reference=round(seconds / base, 3) if base else "",
                            peak_mb=round(memory / 1e6, 2),
                            achieved_gbs=round(floor_bytes / seconds / 1e9, 2),
                            floor_fraction=round(floor_bytes / seconds / bandwidth, 3) if bandwidth else "",
                        )
                        graph_s = graph_times.get(p.name)
                        if isinstance(graph_s, float):
                            row.update(
                                graph_ms=round(graph_s * 1e3, 4),
                                graph_ratio_vs_reference=round(graph_s / graph_base, 3)
                                if isinstance(graph_base, float)
                                else "",
                                graph_floor_fraction=round(floor_bytes / graph_s / bandwidth, 3) if bandwidth else "",
                            )
                        elif graph_s is not None:
                            row["note"] = graph_s
                        print(
                            f"  {p.name:16s} {seconds * 1e3:10.3f} ms  x{seconds / base:6.3f} vs ref  "
                            f"peak {memory / 1e6:9.2f} MB  {row['achieved_gbs']:8.2f} GB/s"
                            + (f"  {row['floor_fraction']:.1%} of floor" if bandwidth else "")
                            + (
                                f"  graph {row['graph_ms']:.3f} ms x{row['graph_ratio_vs_reference']}"
                                if "graph_ms" in row
                                else ""
                            ),
                            flush=True,
                        )
                    rows.append(row)
                write(rows)
                del peers
    print(f"\nwrote {csv_path}")


if __name__ == "__main__":
    main()
