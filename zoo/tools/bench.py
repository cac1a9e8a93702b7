"""Inference and training throughput and peak memory of models, interleaved in one process.

Timings on a shared machine drift, so models are timed round-robin (one step of each, repeated) and
compared by ratio to the first peer within the same run; medians, not means. Peak memory comes from
:mod:`zoo.tools.memory` (allocator statistics on CUDA, a dispatch-mode tracker on CPU).
"""

from __future__ import annotations

import csv
import datetime
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .._factory import create_model
from .memory import track_peak_memory

__all__ = ["BenchRow", "autocast_for", "benchmark_models", "device_name", "sync", "write_csv"]


@dataclass
class BenchRow:
    model: str
    peer: str
    device: str
    dtype: str
    batch_size: int
    img_size: int
    params_m: float
    infer_ms: float
    infer_img_s: float
    infer_time_ratio: float  # this model's step time / the peer's (lower is faster)
    train_ms: float | None
    train_img_s: float | None
    train_time_ratio: float | None
    train_peak_mib: float | None
    train_mem_ratio: float | None  # this model's peak / the peer's
    torch: str
    date: str


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU model and torch's thread count (for result files)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model} ({torch.get_num_threads()} threads)"


def sync(device: torch.device) -> None:
    """Wait for queued CUDA work (no-op on CPU) so that a timer measures the work, not its launch."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def autocast_for(device: torch.device, amp: str) -> AbstractContextManager:
    """Autocast context for ``amp`` in ``none`` / ``bf16`` / ``fp16``."""
    if amp == "none":
        return nullcontext()
    return torch.autocast(device.type, dtype={"bf16": torch.bfloat16, "fp16": torch.float16}[amp])


def _round_robin(steps: dict[str, Callable[[], None]], iters: int, warmup: int, device: torch.device) -> dict:
    for _ in range(warmup):
        for step in steps.values():
            step()
    times: dict[str, list[float]] = {k: [] for k in steps}
    for _ in range(iters):
        for name, step in steps.items():
            sync(device)
            start = time.perf_counter()
            step()
            sync(device)
            times[name].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in times.items()}


def benchmark_models(
    names: Sequence[str],
    peers: Sequence[str] = (),
    batch_size: int = 8,
    img_size: int = 224,
    iters: int = 5,
    warmup: int = 1,
    train: bool = True,
    device: str = "cpu",
    dtype: str = "float32",
    model_kwargs: dict | None = None,
) -> list[BenchRow]:
    """Time ``names`` and ``peers`` interleaved; ratios are to ``peers[0]`` (or ``names[0]`` without peers).

    Args:
        names, peers: registry names (zoo's or timm's); peers are plain baselines.
        batch_size, img_size: the input ``(batch_size, 3, img_size, img_size)``.
        iters, warmup: timed and untimed round-robin rounds.
        train: also time a training step (forward, cross-entropy, backward, SGD step) and its peak memory.
        device, dtype: where to run; ``bfloat16`` / ``float16`` use autocast.
    """
    dev = torch.device(device)
    amp_dtype = {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    all_names = list(dict.fromkeys([*names, *peers]))
    reference = peers[0] if peers else names[0]
    models = {n: create_model(n, **(model_kwargs or {})).to(dev) for n in all_names}
    x = torch.randn(batch_size, 3, img_size, img_size, device=dev)
    target = torch.randint(0, 10, (batch_size,), device=dev)

    def autocast():
        return torch.autocast(dev.type, dtype=amp_dtype, enabled=amp_dtype is not None)

    def infer_step(model: torch.nn.Module) -> Callable[[], None]:
        def step() -> None:
            with torch.no_grad(), autocast():
                model.eval()(x)

        return step

    optimizers = {n: torch.optim.SGD(m.parameters(), lr=1e-4) for n, m in models.items()}

    def train_step(name: str) -> Callable[[], None]:
        model, opt = models[name], optimizers[name]

        def step() -> None:
            model.train()
            with autocast():
                loss = torch.nn.functional.cross_entropy(model(x)[:, :10].float(), target)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        return step

    infer = _round_robin({n: infer_step(m) for n, m in models.items()}, iters, warmup, dev)
    train_times: dict[str, float] = {}
    peaks: dict[str, float] = {}
    if train:
        train_times = _round_robin({n: train_step(n) for n in models}, iters, warmup, dev)
        for name in models:
            with track_peak_memory(dev) as mem:
                train_step(name)()
            peaks[name] = mem.peak_mib

    stamp = datetime.date.today().isoformat()
    rows = []
    for name in all_names:
        params = sum(p.numel() for p in models[name].parameters()) / 1e6
        rows.append(
            BenchRow(
                model=name,
                peer=reference,
                device=device_name(dev),
                dtype=dtype,
                batch_size=batch_size,
                img_size=img_size,
                params_m=round(params, 3),
                infer_ms=round(infer[name] * 1e3, 2),
                infer_img_s=round(batch_size / infer[name], 2),
                infer_time_ratio=round(infer[name] / infer[reference], 3),
                train_ms=round(train_times[name] * 1e3, 2) if train else None,
                train_img_s=round(batch_size / train_times[name], 2) if train else None,
                train_time_ratio=round(train_times[name] / train_times[reference], 3) if train else None,
                train_peak_mib=round(peaks[name], 1) if train else None,
                train_mem_ratio=round(peaks[name] / peaks[reference], 3) if train else None,
                torch=torch.__version__,
                date=stamp,
            )
        )
    return rows


def write_csv(rows: Sequence[BenchRow], path: Path | str) -> Path:
    """Append rows to ``path`` (header written once)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists()
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(asdict(rows[0])))
        if new:
            writer.writeheader()
        for row in rows:
            writer.writerow(asdict(row))
    return path
