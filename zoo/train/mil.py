"""``zoo mil train``: a MIL head (ACMIL by default) on per-slide feature files, with slide-level splits.

Protocol of the ACMIL paper: one bag per step (B = 1), AdamW (lr 1e-4, wd 1e-5), half-cycle cosine decay
to 0 updated every iteration, no warm-up; the model is selected at the epoch with the best validation
macro-F1 + AUC and the test split is reported at that epoch. Metrics: AUC (binary: of the positive class;
multiclass: one-vs-rest macro), **macro**-F1 (the official code's later torchmetrics call defaulted to
micro-F1, which equals accuracy) and accuracy.

Splits are by slide (or by ``--group-col``, e.g. the patient, so one patient's slides never straddle
splits): a ``split`` column of the label CSV (``train``/``val``/``test``) is used when present, otherwise a
stratified, seeded split. Checkpointing, CSV logging and progress reuse ``zoo.train.checkpoint`` and
``zoo.train.metrics``; ``--resume auto`` continues an interrupted run.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .._cli_errors import non_negative_int, parse_json_mapping, positive_int

__all__ = ["MILConfig", "classification_metrics", "split_slides", "train_mil", "add_cli"]


@dataclass
class MILConfig:
    """Options of ``zoo mil train`` (defaults: the ACMIL paper's)."""

    features: str = ""  # folder of <slide_id>.h5 feature files (zoo wsi extract)
    labels: str = ""  # CSV with slide_id, label [, split] [, group] columns
    out: str = "runs/mil"
    model: str = "acmil"
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    epochs: int = 50
    lr: float = 1e-4
    weight_decay: float = 1e-5
    seed: int = 1
    val_frac: float = 0.1
    test_frac: float = 0.2
    split_col: str = "split"
    group_col: str = ""
    slide_col: str = "slide_id"
    label_col: str = "label"
    heatmaps: int = 4  # attention heatmaps of this many test slides
    device: str = "cpu"
    resume: str = ""
    overwrite: bool = False  # start over in a folder that holds another run (its checkpoints and logs go)
    progress: bool = True


RUN_LOGS = ("metrics.csv", "splits.json", "result.json", "test_predictions.csv", "attention", "heatmaps")


def classification_metrics(probs: np.ndarray, target: np.ndarray, num_classes: int) -> dict[str, float]:
    """``auc``, macro ``f1`` and ``acc`` of class probabilities ``(N, C)`` against ``target`` ``(N,)``.

    AUC is NaN when the split holds a single class (undefined).
    """
    pred = probs.argmax(1)
    acc = float((pred == target).mean()) if len(target) else float("nan")
    f1s = []
    for c in range(num_classes):
        tp = int(((pred == c) & (target == c)).sum())
        fp = int(((pred == c) & (target != c)).sum())
        fn = int(((pred != c) & (target == c)).sum())
        f1s.append(2 * tp / (2 * tp + fp + fn) if (2 * tp + fp + fn) else 0.0)
    aucs = [
        _binary_auc(probs[:, c], target == c)
        for c in (range(num_classes) if num_classes > 2 else [1])
        if 0 < (target == c).sum() < len(target)
    ]
    auc = float(np.mean(aucs)) if aucs else float("nan")
    return {"auc": auc, "f1": float(np.mean(f1s)), "acc": acc}


def _binary_auc(score: np.ndarray, positive: np.ndarray) -> float:
    """Mann-Whitney AUC with tied scores counted half."""
    order = np.argsort(score, kind="mergesort")
    ranks = np.empty(len(score))
    sorted_scores = score[order]
    i = 0
    while i < len(score):  # average ranks over ties
        j = i
        while j + 1 < len(score) and sorted_scores[j + 1] == sorted_scores[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2 + 1
        i = j + 1
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def split_slides(
    slide_ids: list[str],
    labels: list[int],
    val_frac: float,
    test_frac: float,
    seed: int,
    groups: list[str] | None = None,
) -> dict[str, list[str]]:
    """Stratified slide-level split; with ``groups`` every group (patient) falls in exactly one split."""
    groups = groups or slide_ids
    by_group: dict[str, list[int]] = {}
    for i, g in enumerate(groups):
        by_group.setdefault(g, []).append(i)
    rng = random.Random(seed)
    out: dict[str, list[str]] = {"train": [], "val": [], "test": []}
    for label in sorted(set(labels)):
        # a group's class = the label of its first slide (groups are usually one patient, one diagnosis)
        members = [g for g, idx in by_group.items() if labels[idx[0]] == label]
        rng.shuffle(members)
        n_test, n_val = round(len(members) * test_frac), round(len(members) * val_frac)
        parts = {"test": members[:n_test], "val": members[n_test : n_test + n_val], "train": members[n_test + n_val :]}
        for split, gs in parts.items():
            out[split] += [slide_ids[i] for g in gs for i in by_group[g]]
    return out


def _evaluate(head: torch.nn.Module, dataset: Any, indices: list[int], device: torch.device) -> dict[str, Any]:
    head.eval()
    probs, targets, attention = [], [], []
    with torch.no_grad():
        for i in indices:
            bag = dataset[i]
            out = head(bag["features"].to(device))
            probs.append(torch.softmax(out["logits"].float(), -1)[0].cpu().numpy())
            targets.append(bag["label"])
            att = out.get("slide_attention", out["attention"].mean(1))
            attention.append(att[0].float().cpu().numpy())
    probs_arr = np.stack(probs) if probs else np.zeros((0, head.num_classes))
    metrics = classification_metrics(probs_arr, np.asarray(targets), head.num_classes)
    return {**metrics, "probs": probs_arr, "targets": np.asarray(targets), "attention": attention}


def train_mil(cfg: MILConfig) -> dict[str, Any]:
    """Train ``cfg.model`` on the bags; return the test metrics at the best validation epoch and the splits."""
    import zoo
    from zoo._io import atomic_write_text, load_state_dict_checked
    from zoo.data.wsi import BagDataset, attention_heatmap
    from zoo.train.checkpoint import (
        CheckpointManager,
        capture_rng_state,
        load_checkpoint_file,
        prepare_run_folder,
        restore_rng_state,
    )
    from zoo.train.metrics import MetricLogger, Progress, rewind_csv

    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    out_dir = Path(cfg.out)
    device = torch.device(cfg.device)
    ckpt = CheckpointManager(out_dir / "checkpoints", keep_last=1, mode="max")
    prepare_run_folder(out_dir, ckpt, cfg.resume, cfg.overwrite, RUN_LOGS)
    state = ckpt.resolve_resume(cfg.resume)
    if state is not None and state["epoch"] + 1 >= cfg.epochs and (out_dir / "result.json").is_file():
        print(f"run in {out_dir} already finished (epoch {state['epoch']}): nothing to do")
        return json.loads((out_dir / "result.json").read_text())
    dataset = BagDataset(cfg.features, cfg.labels, slide_col=cfg.slide_col, label_col=cfg.label_col)
    if len(dataset) == 0:
        raise ValueError(f"no slide of {cfg.labels} has a feature file in {cfg.features}")
    ids = [r["slide_id"] for r in dataset.records]
    if all(r.get(cfg.split_col) for r in dataset.records):
        splits = {
            s: [r["slide_id"] for r in dataset.records if r[cfg.split_col] == s] for s in ("train", "val", "test")
        }
    else:
        groups = [r[cfg.group_col] for r in dataset.records] if cfg.group_col else None
        splits = split_slides(ids, dataset.labels, cfg.val_frac, cfg.test_frac, cfg.seed, groups)
    if not splits["train"] or not splits["val"]:
        raise ValueError(f"empty train or val split ({ {k: len(v) for k, v in splits.items()} }); add slides")
    index = {sid: i for i, sid in enumerate(ids)}
    split_idx = {k: [index[s] for s in v] for k, v in splits.items()}

    num_classes = len(dataset.classes)
    head = zoo.create_model(cfg.model, in_dim=dataset.in_dim, num_classes=num_classes, **cfg.model_kwargs).to(device)
    optimizer = torch.optim.AdamW(head.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    total_steps = cfg.epochs * len(split_idx["train"])
    # half-cycle cosine to 0, per iteration, no warm-up (ACMIL)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * min(step, total_steps) / total_steps))
    )
    start_epoch = 0
    if state is not None:
        load_state_dict_checked(head, state["model"], f"checkpoint {state['path']}")
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        restore_rng_state(state["rng"])
        start_epoch = state["epoch"] + 1
    if cfg.resume:  # rows logged after the resumed checkpoint are logged again
        rewind_csv(out_dir / "metrics.csv", start_epoch * len(split_idx["train"]))
    logger = MetricLogger(out_dir, config=asdict(cfg))
    atomic_write_text(out_dir / "splits.json", json.dumps(splits, indent=1))

    for epoch in range(start_epoch, cfg.epochs):
        head.train()
        order = list(split_idx["train"])
        random.shuffle(order)
        losses = []
        with Progress(len(order), desc=f"epoch {epoch}", enabled=cfg.progress) as bar:
            for i in order:
                bag = dataset[i]
                out = head(bag["features"].to(device))
                terms = head.loss(out, torch.tensor([bag["label"]], device=device))
                optimizer.zero_grad(set_to_none=True)
                terms["loss"].backward()
                optimizer.step()
                scheduler.step()
                losses.append(float(terms["loss"].detach()))
                bar.update(loss=losses[-1])
        val = _evaluate(head, dataset, split_idx["val"], device)
        score = np.nan_to_num(val["f1"]) + np.nan_to_num(val["auc"])  # ACMIL: best val F1 + AUC
        row = dict(epoch=epoch, train_loss=float(np.mean(losses)), val_auc=val["auc"], val_f1=val["f1"])
        row.update(val_acc=val["acc"], lr=scheduler.get_last_lr()[0])
        logger.log(row, step=(epoch + 1) * len(order))
        state = dict(
            model=head.state_dict(),
            optimizer=optimizer.state_dict(),
            scheduler=scheduler.state_dict(),
            rng=capture_rng_state(),
            epoch=epoch,
            config=asdict(cfg),
            classes=dataset.classes,
            in_dim=dataset.in_dim,
        )
        ckpt.save(state, step=epoch, metric=float(score))
    logger.close()

    if not ckpt.best_path.is_file():
        raise RuntimeError(f"no checkpoint in {ckpt.directory}: nothing was trained (epochs={cfg.epochs})")
    best = load_checkpoint_file(ckpt.best_path, map_location=device)
    load_state_dict_checked(head, best["model"], f"checkpoint {ckpt.best_path}")
    result: dict[str, Any] = {"best_epoch": best["epoch"], "splits": splits, "classes": dataset.classes}
    for split in ("val", "test"):
        if split_idx[split]:
            ev = _evaluate(head, dataset, split_idx[split], device)
            result[split] = {k: ev[k] for k in ("auc", "f1", "acc")}
            if split == "test":
                _write_predictions(out_dir / "test_predictions.csv", splits["test"], ev, dataset.classes)
                (out_dir / "attention").mkdir(exist_ok=True)
                for sid, att in zip(splits["test"], ev["attention"]):
                    np.save(out_dir / "attention" / f"{sid}.npy", att)  # for `zoo wsi heatmap` later
                for sid, att in list(zip(splits["test"], ev["attention"]))[: cfg.heatmaps]:
                    attention_heatmap(dataset.records[index[sid]]["path"], att, out_dir / "heatmaps" / f"{sid}.png")
    atomic_write_text(out_dir / "result.json", json.dumps(result, indent=1, default=str))
    return result


def _write_predictions(path: Path, ids: list[str], ev: dict[str, Any], classes: list[str]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["slide_id", "label", "pred", *[f"p_{c}" for c in classes]])
        for sid, t, p in zip(ids, ev["targets"], ev["probs"]):
            writer.writerow([sid, classes[t], classes[int(p.argmax())], *[f"{v:.6f}" for v in p]])


def _cmd_train(args: argparse.Namespace) -> int:
    cfg = MILConfig(
        features=args.features, labels=args.labels, out=args.out, model=args.model,
        model_kwargs=parse_json_mapping(args.model_kwargs, "--model-kwargs"), epochs=args.epochs, lr=args.lr,
        weight_decay=args.weight_decay,
        seed=args.seed, val_frac=args.val_frac, test_frac=args.test_frac, group_col=args.group_col,
        heatmaps=args.heatmaps, device=args.device, resume=args.resume, overwrite=args.overwrite,
    )  # fmt: skip
    result = train_mil(cfg)
    for split in ("val", "test"):
        if split in result:
            m = result[split]
            print(f"{split}: AUC {m['auc']:.4f}  macro-F1 {m['f1']:.4f}  acc {m['acc']:.4f}")
    print(f"best epoch {result['best_epoch']}; run folder {cfg.out}")
    return 0


def add_cli(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``zoo mil train`` to the ``zoo`` command's sub-parsers."""
    d = MILConfig()
    p = subparsers.add_parser("mil", help="multiple-instance learning on slide feature files")
    sub = p.add_subparsers(dest="mil_command", required=True)
    t = sub.add_parser("train", help="train a MIL head (ACMIL by default) with slide-level splits")
    t.add_argument("--features", required=True, help="folder of <slide_id>.h5 files from `zoo wsi extract`")
    t.add_argument("--labels", required=True, help="CSV: slide_id,label[,split][,<group col>]")
    t.add_argument("--out", default=d.out, help="run folder: checkpoints, metrics.csv, result.json, heatmaps")
    t.add_argument("--model", default=d.model, help="MIL head (zoo list --kind mil_head)")
    t.add_argument("--model-kwargs", default="{}", help="JSON kwargs, e.g. '{\"mask_drop\": 0.0}'")
    t.add_argument("--epochs", type=positive_int, default=d.epochs, help="epochs (ACMIL: 50)")
    t.add_argument("--lr", type=float, default=d.lr, help="AdamW lr, cosine-decayed per iteration")
    t.add_argument("--weight-decay", type=float, default=d.weight_decay, help="AdamW weight decay")
    t.add_argument("--seed", type=int, default=d.seed, help="seed of the split and of training")
    t.add_argument("--val-frac", type=float, default=d.val_frac, help="validation fraction (no split column)")
    t.add_argument("--test-frac", type=float, default=d.test_frac, help="test fraction (no split column)")
    t.add_argument("--group-col", default=d.group_col, help="CSV column keeping a patient's slides together")
    t.add_argument(
        "--heatmaps", type=non_negative_int, default=d.heatmaps, help="attention heatmaps of this many test slides"
    )
    t.add_argument("--device", default=d.device, help="torch device")
    t.add_argument("--resume", default=d.resume, help="'' fresh, 'auto' latest checkpoint, or a path")
    t.add_argument("--overwrite", action="store_true", help="start over in a folder holding another run (deletes it)")
    t.set_defaults(func=_cmd_train)
    return p
