"""``zoo probe``: freeze a backbone, cache its tokens on disk, train probing heads, compare them.

Steps:

1. Any zoo or timm backbone is built by name and frozen; ``forward_features`` gives tokens (B, N, D)
   (feature maps (B, C, H, W) become (B, H·W, C) tokens). ``num_prefix_tokens`` ([CLS], registers) is read
   from the model and passed to every probe.
2. Tokens are cached under ``--cache`` (``TokenCache``): ``meta.json`` names the backbone, the feature dim,
   the token count and the data; each split is a list of ``chunk_#####.pt`` files written atomically, so
   an interrupted extraction resumes at the first missing chunk. A cache made by another backbone (or at
   another size, or of other data) is a ``TokenCacheMismatchError`` that names both.
3. Each probe (registry kind ``probe``, e.g. ``efficient_probe``) is trained on the cached tokens with the
   paper's protocol by default: LARS (momentum 0.9, trust ratio on matrices only, weight decay 0),
   ``lr = blr · batch / 256``, linear warm-up then half-cycle cosine per step, best-epoch top-1 recorded
   (AdamW is the other choice). Checkpoints (``zoo.train.checkpoint``) make a run resumable per probe
   (``--resume auto``); metrics go to ``<out>/<probe>/metrics.csv``; ``<out>/summary.csv`` has one row per
   probe: best and last top-1, trainable and pooling parameters, training throughput.

Data: ``digits`` (scikit-learn's embedded 8x8 digits, upsampled, 3 channels, fixed-seed 75/25 split) or
``folder:PATH`` (``PATH/train`` and ``PATH/val`` in ImageFolder layout).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from .._cli_errors import non_negative_int, parse_json_mapping, positive_int
from .._io import atomic_write, atomic_write_text, clean_temporaries, load_state_dict_checked, plain_name, safe_load
from .checkpoint import (
    CheckpointManager,
    RunFolderError,
    atomic_save,
    capture_rng_state,
    check_out_dir,
    prepare_run_folder,
    restore_rng_state,
)
from .metrics import MetricLogger, Progress, rewind_csv

__all__ = [
    "ProbeConfig",
    "TokenCache",
    "TokenCacheMismatchError",
    "add_cli",
    "extract_tokens",
    "load_image_data",
    "run_probe",
    "train_probe",
]

DEFAULT_PROBES = ("linear_probe_cls", "linear_probe_avg", "efficient_probe", "attentive_probe")


class TokenCacheMismatchError(RuntimeError):
    """A token cache on disk was made by another backbone, size or data set."""


@dataclass
class ProbeConfig:
    """Options of ``zoo probe``; every field has a default and a one-line help in ``add_cli``."""

    backbone: str = "vit_tiny_patch16_224"
    backbone_kwargs: dict[str, Any] = field(default_factory=dict)
    pretrained: bool = False
    probes: tuple[str, ...] = DEFAULT_PROBES
    probe_kwargs: dict[str, Any] = field(default_factory=dict)
    data: str = "digits"
    img_size: int = 224
    cache: str = "probe_cache"
    out: str = "probe_runs"
    chunk_size: int = 256
    epochs: int = 90
    batch_size: int = 4096
    opt: str = "lars"
    blr: float = 0.1
    weight_decay: float = 0.0
    warmup_epochs: int = 10
    seed: int = 0
    resume: str = ""
    overwrite: bool = False  # start over in an --out that holds another run (its checkpoints and logs go)
    device: str = "cpu"


PROBE_LOGS = ("metrics.csv",)  # per probe folder, besides its checkpoints
RUN_LOGS = ("summary.csv", "config.json")  # in --out


# ----------------------------------------------------------------------------------------------- data


def load_image_data(data: str, img_size: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{'train': (images (N, 3, S, S) in [0, 1], labels (N,)), 'val': (...)}``."""
    if data == "digits":
        from sklearn.datasets import load_digits

        digits = load_digits()
        images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0  # (1797, 1, 8, 8)
        images = F.interpolate(images, size=(img_size, img_size), mode="bilinear", align_corners=False)
        images = images.expand(-1, 3, -1, -1).contiguous()
        labels = torch.tensor(digits.target, dtype=torch.long)
        order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))  # fixed split
        n_train = int(0.75 * len(labels))
        return {
            "train": (images[order[:n_train]], labels[order[:n_train]]),
            "val": (images[order[n_train:]], labels[order[n_train:]]),
        }
    if data.startswith("folder:"):
        from torchvision import datasets, transforms

        root = Path(data.split(":", 1)[1])
        tf = transforms.Compose([transforms.Resize(img_size), transforms.CenterCrop(img_size), transforms.ToTensor()])
        out = {}
        for split in ("train", "val"):
            if not (root / split).is_dir():
                raise FileNotFoundError(f"--data {data}: expected ImageFolder sub-folders {root}/train and {root}/val")
            ds = datasets.ImageFolder(str(root / split), transform=tf)
            images = torch.stack([ds[i][0] for i in range(len(ds))])
            out[split] = (images, torch.tensor(ds.targets, dtype=torch.long))
        return out
    raise ValueError(f"unknown --data {data!r}; expected 'digits' or 'folder:PATH'")


# ---------------------------------------------------------------------------------------------- tokens


def _tokens_of(backbone: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Frozen features as tokens (B, N, D)."""
    feats = backbone.forward_features(images)
    if isinstance(feats, (list, tuple)):
        feats = feats[-1]
    if feats.ndim == 4:  # (B, C, H, W) feature map: one token per position
        feats = feats.flatten(2).transpose(1, 2)
    if feats.ndim != 3:
        raise ValueError(f"backbone features have shape {tuple(feats.shape)}; expected (B, N, D) or (B, C, H, W)")
    return feats


@torch.inference_mode()
def extract_tokens(
    backbone: nn.Module, images: torch.Tensor, batch_size: int = 64, device: str = "cpu"
) -> torch.Tensor:
    """Tokens (B, N, D) of ``images`` (B, 3, H, W) in [0, 1], normalised with the backbone's data config."""
    from timm.data import resolve_data_config

    cfg = resolve_data_config(model=backbone)
    mean = torch.tensor(cfg["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(cfg["std"]).view(1, 3, 1, 1)
    out = []
    for start in range(0, len(images), batch_size):
        batch = ((images[start : start + batch_size] - mean) / std).to(device)
        out.append(_tokens_of(backbone, batch).float().cpu())
    return torch.cat(out)


class TokenCache:
    """Resumable on-disk cache of a frozen backbone's tokens, one folder per split.

    Layout: ``meta.json`` (backbone, feature_dim, num_tokens, num_prefix_tokens, data, img_size, chunk_size,
    split sizes) and ``<split>/chunk_#####.pt`` = ``{'tokens': (n, N, D), 'labels': (n,)}``.
    """

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)

    @property
    def meta_path(self) -> Path:
        return self.root / "meta.json"

    def read_meta(self) -> dict[str, Any] | None:
        """``meta.json`` (checked: a mapping whose split names are plain folder names), or None."""
        if not self.meta_path.is_file():
            return None
        try:
            meta = json.loads(self.meta_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise TokenCacheMismatchError(f"{self.meta_path} is not valid JSON ({err}); delete {self.root}") from None
        if not isinstance(meta, dict) or not isinstance(meta.get("splits"), dict):
            raise TokenCacheMismatchError(f"{self.meta_path} is not a token-cache meta file; delete {self.root}")
        for split in meta["splits"]:  # split names become folder names: they may not leave the cache
            plain_name(split, "split name", str(self.meta_path))
        return meta

    def check_or_write_meta(self, meta: dict[str, Any]) -> None:
        """Write ``meta`` on first use; later, any difference in the identifying keys is an error."""
        old = self.read_meta()
        if old is None:
            atomic_write_text(self.meta_path, json.dumps(meta, indent=2))  # a reader sees no half-written meta
            return
        keys = ("backbone", "feature_dim", "num_tokens", "img_size", "data", "chunk_size", "splits")
        diff = {k: (old.get(k), meta.get(k)) for k in keys if old.get(k) != meta.get(k)}
        if diff:
            detail = "; ".join(f"{k}: cached {a!r}, requested {b!r}" for k, (a, b) in diff.items())
            raise TokenCacheMismatchError(
                f"token cache {self.root} was made by backbone {old.get('backbone')!r} (dim "
                f"{old.get('feature_dim')}), not {meta.get('backbone')!r} (dim {meta.get('feature_dim')}): {detail}. "
                "Use another --cache folder or delete this one."
            )

    def chunk_path(self, split: str, index: int) -> Path:
        return self.root / split / f"chunk_{index:05d}.pt"

    def build(
        self,
        backbone: nn.Module,
        meta: dict[str, Any],
        data: dict[str, tuple[torch.Tensor, torch.Tensor]],
        device: str = "cpu",
    ) -> dict[str, int]:
        """Extract the missing chunks of every split; returns how many chunks each split wrote now."""
        self.check_or_write_meta(meta)
        written = {}
        chunk = meta["chunk_size"]
        for split, (images, labels) in data.items():
            written[split] = 0
            clean_temporaries(self.root / split)  # what an interrupted chunk write left behind
            for index, start in enumerate(range(0, len(images), chunk)):
                path = self.chunk_path(split, index)
                if path.is_file():  # finished earlier: chunks are written atomically, so it is whole
                    continue
                tokens = extract_tokens(backbone, images[start : start + chunk], device=device)
                atomic_save({"tokens": tokens, "labels": labels[start : start + chunk].clone()}, path)
                written[split] += 1
        return written

    def load(self, split: str, backbone: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(tokens (n, N, D), labels (n,)) of a finished split."""
        meta = self.read_meta()
        if meta is None:
            raise FileNotFoundError(f"no token cache at {self.root} (meta.json missing); run `zoo probe` to build it")
        if backbone is not None and meta["backbone"] != backbone:
            raise TokenCacheMismatchError(
                f"token cache {self.root} holds tokens of {meta['backbone']!r} (dim {meta['feature_dim']}), "
                f"not of {backbone!r}; use another --cache folder"
            )
        if split not in meta["splits"]:
            raise KeyError(f"token cache {self.root} has no split {split!r}; it holds {sorted(meta['splits'])}")
        n = meta["splits"][split]
        chunks = []
        for i in range(math.ceil(n / meta["chunk_size"])):
            path = self.chunk_path(split, i)
            if not path.is_file():
                raise TokenCacheMismatchError(
                    f"token cache {self.root} is incomplete: {path} is missing (an interrupted run); rerun "
                    "`zoo probe` with the same --cache to finish it"
                )
            chunk = safe_load(path, what="token chunk")  # no file in a cache folder runs code
            if not isinstance(chunk, dict) or not {"tokens", "labels"} <= set(chunk):
                raise TokenCacheMismatchError(f"{path} is not a token chunk; the cache is corrupt, delete {self.root}")
            if chunk["tokens"].shape[-1] != meta["feature_dim"]:
                raise TokenCacheMismatchError(
                    f"{path} holds {chunk['tokens'].shape[-1]}-dim tokens but meta.json says "
                    f"{meta['feature_dim']} ({meta['backbone']!r}); the cache is corrupt, delete {self.root}"
                )
            chunks.append(chunk)
        return torch.cat([c["tokens"] for c in chunks]), torch.cat([c["labels"] for c in chunks])


# ---------------------------------------------------------------------------------------------- training


def _optimizer(model: nn.Module, opt: str, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    matrices = [p for p in params if p.ndim > 1]
    vectors = [p for p in params if p.ndim <= 1]
    if opt == "lars":
        from timm.optim import Lars

        # MAE's LARS: trust ratio and weight decay on matrices only, never on biases, norms or queries' rows
        groups = [
            dict(params=matrices, weight_decay=weight_decay, always_adapt=True),
            dict(params=vectors, weight_decay=0.0, always_adapt=False),
        ]
        return Lars([g for g in groups if g["params"]], lr=lr, momentum=0.9)
    if opt == "adamw":
        groups = [dict(params=matrices, weight_decay=weight_decay), dict(params=vectors, weight_decay=0.0)]
        return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr)
    raise ValueError(f"unknown --opt {opt!r}; expected 'lars' or 'adamw'")


def _warmup_cosine(warmup_steps: int, total_steps: int):
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


@torch.no_grad()
def evaluate(probe: nn.Module, tokens: torch.Tensor, labels: torch.Tensor, batch_size: int = 512) -> float:
    """Top-1 accuracy (%) of ``probe`` on tokens (n, N, D)."""
    probe.eval()
    correct = 0
    for start in range(0, len(tokens), batch_size):
        logits = probe(tokens[start : start + batch_size])
        correct += (logits.argmax(-1) == labels[start : start + batch_size]).sum().item()
    return 100.0 * correct / max(1, len(tokens))


def train_probe(
    probe: nn.Module,
    train: tuple[torch.Tensor, torch.Tensor],
    val: tuple[torch.Tensor, torch.Tensor],
    epochs: int = 90,
    batch_size: int = 4096,
    opt: str = "lars",
    blr: float = 0.1,
    weight_decay: float = 0.0,
    warmup_epochs: int = 10,
    seed: int = 0,
    out_dir: str | os.PathLike | None = None,
    resume: str = "",
    verbose: bool = True,
    device: str = "cpu",
    stop_epoch: int | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Train ``probe`` on cached tokens; returns best/last top-1, parameters and throughput.

    Args:
        train, val: (tokens (n, N, D), labels (n,)).
        batch_size: capped at the training-set size; ``lr = blr * batch / 256``.
        out_dir: checkpoints and ``metrics.csv`` go here (``None``: nothing is written).
        resume: ``''`` fresh, ``'auto'`` latest checkpoint in ``out_dir``, or a checkpoint path.
        stop_epoch: leave after this many epochs (a time-boxed job; resume with ``resume='auto'``).
        overwrite: start over in an ``out_dir`` that holds another run (its checkpoints and metrics go).
    """
    torch.manual_seed(seed)
    probe.to(device)
    tokens, labels = (t.to(device) for t in train)
    val = tuple(t.to(device) for t in val)
    batch_size = min(batch_size, len(tokens))
    steps_per_epoch = math.ceil(len(tokens) / batch_size)
    lr = blr * batch_size / 256
    optimizer = _optimizer(probe, opt, lr, weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, _warmup_cosine(warmup_epochs * steps_per_epoch, epochs * steps_per_epoch)
    )
    manager = CheckpointManager(out_dir, keep_last=1, mode="max") if out_dir is not None else None
    if manager is not None:
        prepare_run_folder(out_dir, manager, resume, overwrite, PROBE_LOGS)
    start_epoch, best, history = 0, -1.0, []
    state = manager.resolve_resume(resume) if manager is not None and resume else None
    if out_dir is not None and resume:  # rows logged after the resumed checkpoint are logged again
        rewind_csv(Path(out_dir) / "metrics.csv", (state["epoch"] + 1) * steps_per_epoch if state else 0)
    logger = MetricLogger(out_dir) if out_dir is not None else None
    if state is not None:
        load_state_dict_checked(probe, state["model"], f"checkpoint {state['path']}")
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        restore_rng_state(state["rng"])
        start_epoch, best, history = state["epoch"] + 1, state["best_top1"], state["history"]
    train_time, train_samples = 0.0, 0
    for epoch in range(start_epoch, epochs):
        probe.train()
        order = torch.randperm(len(tokens)).to(device)
        progress = Progress(steps_per_epoch, f"{type(probe.pool).__name__} {epoch + 1}/{epochs}", enabled=verbose)
        t0 = time.perf_counter()
        loss_sum = 0.0
        for step in range(steps_per_epoch):
            idx = order[step * batch_size : (step + 1) * batch_size]
            loss = F.cross_entropy(probe(tokens[idx]), labels[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            loss_sum += loss.item()
            progress.update(loss=loss.item())
        progress.close()
        train_time += time.perf_counter() - t0
        train_samples += len(tokens)
        top1 = evaluate(probe, *val)
        best = max(best, top1)
        row = dict(epoch=epoch, train_loss=loss_sum / steps_per_epoch, val_top1=top1, lr=scheduler.get_last_lr()[0])
        history.append(row)
        if logger is not None:
            logger.log(row, step=(epoch + 1) * steps_per_epoch)
        if manager is not None:
            state = dict(
                model=probe.state_dict(), optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(),
                rng=capture_rng_state(), epoch=epoch, best_top1=best, history=history,
            )  # fmt: skip
            manager.save(state, step=epoch, metric=top1)
        if stop_epoch is not None and epoch + 1 >= stop_epoch:
            break
    if logger is not None:
        logger.close()
    trainable = sum(p.numel() for p in probe.parameters() if p.requires_grad)
    pool = probe.pool_parameters() if hasattr(probe, "pool_parameters") else float("nan")
    return dict(
        best_top1=best,
        last_top1=history[-1]["val_top1"] if history else float("nan"),
        trainable_params=trainable,
        pool_params=pool,
        train_samples_per_s=train_samples / train_time if train_time else float("nan"),
        epochs=epochs,
        history=history,
    )


def run_probe(cfg: ProbeConfig, verbose: bool = True) -> list[dict[str, Any]]:
    """The whole ``zoo probe`` run: build the backbone, fill the token cache, train each probe."""
    import zoo

    out = Path(cfg.out)
    _prepare_probe_run(out, cfg)
    finished = _finished_summary(out, cfg)
    if finished is not None:  # --resume auto on a finished run: no step, nothing written
        if verbose:
            print(f"probe run in {out} already finished: nothing to do (summary.csv holds its results)")
        return finished
    torch.manual_seed(cfg.seed)
    data = load_image_data(cfg.data, cfg.img_size)
    backbone = zoo.create_model(cfg.backbone, pretrained=cfg.pretrained, num_classes=0, **cfg.backbone_kwargs)
    backbone.eval().requires_grad_(False).to(cfg.device)
    sample = extract_tokens(backbone, data["train"][0][:1], device=cfg.device)
    meta = dict(
        backbone=cfg.backbone,
        backbone_kwargs=cfg.backbone_kwargs,
        pretrained=cfg.pretrained,
        feature_dim=int(sample.shape[-1]),
        num_tokens=int(sample.shape[1]),
        num_prefix_tokens=int(getattr(backbone, "num_prefix_tokens", 0)),
        img_size=cfg.img_size,
        data=cfg.data,
        chunk_size=cfg.chunk_size,
        splits={k: len(v[1]) for k, v in data.items()},
        num_classes=int(max(int(v[1].max()) for v in data.values()) + 1),
    )
    cache = TokenCache(cfg.cache)
    cache.build(backbone, meta, data, device=cfg.device)
    train, val = cache.load("train", cfg.backbone), cache.load("val", cfg.backbone)
    del backbone
    rows: list[dict[str, Any]] = []
    for name in cfg.probes:
        kwargs = dict(embed_dim=meta["feature_dim"], num_classes=meta["num_classes"])
        kwargs.update(num_prefix_tokens=meta["num_prefix_tokens"], **cfg.probe_kwargs.get(name, {}))
        if name == "linear_probe_cls" and meta["num_prefix_tokens"] == 0:
            if verbose:
                print(f"skip {name}: backbone {cfg.backbone} has no [CLS] token")
            continue
        probe = zoo.create_model(name, **kwargs)
        result = train_probe(
            probe, train, val, epochs=cfg.epochs, batch_size=cfg.batch_size, opt=cfg.opt, blr=cfg.blr,
            weight_decay=cfg.weight_decay, warmup_epochs=cfg.warmup_epochs, seed=cfg.seed,
            out_dir=out / name, resume=cfg.resume, verbose=verbose, device=cfg.device,
        )  # fmt: skip
        row = dict(
            probe=name, backbone=cfg.backbone, data=cfg.data, **{k: v for k, v in result.items() if k != "history"}
        )
        rows.append(row)
        _write_summary(out / "summary.csv", rows)  # rewritten whole: a resumed run never appends twice
        if verbose:
            print(
                f"{name:20s} best top-1 {row['best_top1']:6.2f}  last {row['last_top1']:6.2f}  "
                f"trainable {row['trainable_params']:>10,}  pool {row['pool_params']:>10,}  "
                f"{row['train_samples_per_s']:,.0f} samples/s"
            )
    atomic_write_text(out / "config.json", json.dumps(asdict(cfg), indent=2))
    return rows


def _prepare_probe_run(out: Path, cfg: ProbeConfig) -> None:
    """The run-folder rules of ``zoo.train.checkpoint.prepare_run_folder`` for ``--out`` and each probe folder."""
    check_out_dir(out)
    folders = sorted({out / name for name in cfg.probes} | {p for p in out.glob("*") if p.is_dir()})
    managers = [(folder, CheckpointManager(folder, keep_last=1, mode="max")) for folder in folders]
    if not cfg.resume:
        held = [m for _, m in managers if m.run_files()] or [p for p in (out / n for n in RUN_LOGS) if p.is_file()]
        if held and not cfg.overwrite:
            raise RunFolderError(
                f"{out} already holds a probe run; pass --resume auto to continue it, --overwrite to start over "
                "(its checkpoints and logs are deleted), or another --out"
            )
        if held:
            for folder, manager in managers:
                prepare_run_folder(folder, manager, "", True, PROBE_LOGS)
            for name in RUN_LOGS:
                (out / name).unlink(missing_ok=True)
    elif cfg.overwrite:
        raise RunFolderError(f"--overwrite starts over and --resume {cfg.resume} continues a run: pass one of them")


def _finished_summary(out: Path, cfg: ProbeConfig) -> list[dict[str, Any]] | None:
    """The summary rows of a finished run resumed with ``auto`` (every probe at its last epoch), else None."""
    if cfg.resume != "auto" or not (out / "summary.csv").is_file():
        return None
    for name in cfg.probes:
        latest = CheckpointManager(out / name).latest_path()
        if name == "linear_probe_cls" and latest is None:
            continue  # skipped for backbones without [CLS]
        if latest is None or int(latest.stem.rsplit("_", 1)[1]) + 1 < cfg.epochs:
            return None
    with open(out / "summary.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    return [{k: _number_or_text(v) for k, v in row.items()} for row in rows]


def _number_or_text(text: str) -> Any:
    try:
        return int(text)
    except ValueError:
        try:
            return float(text)
        except ValueError:
            return text


def _write_summary(path: Path, rows: list[dict[str, Any]]) -> None:
    with atomic_write(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


# ---------------------------------------------------------------------------------------------- cli


def _cmd_probe(args: argparse.Namespace) -> int:
    cfg = ProbeConfig(
        backbone=args.backbone, backbone_kwargs=parse_json_mapping(args.backbone_kwargs, "--backbone-kwargs"),
        pretrained=args.pretrained, probes=tuple(args.probes),
        probe_kwargs=parse_json_mapping(args.probe_kwargs, "--probe-kwargs"), data=args.data,
        img_size=args.img_size, cache=args.cache, out=args.out, chunk_size=args.chunk_size, epochs=args.epochs,
        batch_size=args.batch_size, opt=args.opt, blr=args.blr, weight_decay=args.weight_decay,
        warmup_epochs=args.warmup_epochs, seed=args.seed, resume=args.resume, device=args.device,
        overwrite=args.overwrite,
    )  # fmt: skip
    run_probe(cfg)
    return 0


def add_cli(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``zoo probe`` to the ``zoo`` command's sub-parsers."""
    d = ProbeConfig()
    p = subparsers.add_parser("probe", help="freeze a backbone, cache its tokens, train and compare probes")
    p.add_argument("--backbone", default=d.backbone, help="any zoo or timm architecture")
    p.add_argument("--backbone-kwargs", default="{}", help="JSON kwargs for the backbone, e.g. '{\"img_size\": 32}'")
    p.add_argument("--pretrained", action="store_true", help="load the backbone's weights")
    p.add_argument("--probes", nargs="+", default=list(d.probes), help="probe entries (zoo list --kind probe)")
    p.add_argument(
        "--probe-kwargs", default="{}", help='JSON {probe: kwargs}, e.g. \'{"efficient_probe": {"num_queries": 16}}\''
    )
    p.add_argument("--data", default=d.data, help="'digits' (embedded) or 'folder:PATH' (PATH/train, PATH/val)")
    p.add_argument("--img-size", type=positive_int, default=d.img_size, help="input size of the backbone")
    p.add_argument("--cache", default=d.cache, help="token cache folder (resumable)")
    p.add_argument("--out", default=d.out, help="run folder: per-probe checkpoints, metrics.csv, summary.csv")
    p.add_argument("--chunk-size", type=positive_int, default=d.chunk_size, help="images per cache chunk file")
    p.add_argument("--epochs", type=positive_int, default=d.epochs, help="training epochs (paper: 90)")
    p.add_argument(
        "--batch-size", type=positive_int, default=d.batch_size, help="batch (paper: 4096; capped at the train set)"
    )
    p.add_argument("--opt", default=d.opt, choices=["lars", "adamw"], help="optimizer (paper: LARS)")
    p.add_argument("--blr", type=float, default=d.blr, help="base lr; lr = blr * batch / 256 (paper: 0.1)")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay, help="weight decay (paper: 0)")
    p.add_argument(
        "--warmup-epochs", type=non_negative_int, default=d.warmup_epochs, help="linear warm-up epochs (paper: 10)"
    )
    p.add_argument("--seed", type=int, default=d.seed, help="random seed")
    p.add_argument("--resume", default=d.resume, help="'' fresh, 'auto' latest checkpoint per probe, or a path")
    p.add_argument("--device", default=d.device, help="device for extraction and training")
    p.add_argument("--overwrite", action="store_true", help="start over in an --out holding another run (deletes it)")
    p.set_defaults(func=_cmd_probe)
    return p
