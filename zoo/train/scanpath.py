"""``zoo scanpath train|eval|predict|convert``: train and evaluate a scanpath head (OAT) on object-level scanpaths.

Metrics (object-index sequences; OAT spec §6):

* ``sequence_score(a, b)``: Needleman–Wunsch alignment score (match 1, mismatch 0, gap 0) divided by the
  longer length.
* ``edit_distance(a, b)``: Levenshtein distance (``normalised=True`` divides by the longer length).
* ``multimatch(a, b, centres, screen)``: vector, direction, length and position similarities of the
  ``multimatch-gaze`` package on object-centre pixel coordinates (duration unused: a constant is passed);
  NaN when either path has fewer than 3 fixations (the package's own rule) or the package is missing.
* ``behaviour_stats(seq, target)``: (1) target found (last fixation on the target), (2) length, (3) search
  = fraction of first visits, (4) refixation = fraction of immediate repeats, (5) revisit = fraction of
  returns to an object seen earlier but not just before. ``behaviour_delta(model, human)`` = mean over the
  five of |model - human| / human, with |model - human| where the human value is 0 (stated, the published
  formula divides by zero there).
* ``random_scanpaths``: the random-fixation baseline (uniform over the display's objects, lengths drawn
  from the training lengths).

Training: Adam (lr 1e-4), gradient clip 1.0, batch 20, teacher forcing + cross-entropy, early stopping on
the validation behavioural delta of greedy decodes (patience 30), seed 1234: the paper's recipe. Checkpoints
(``zoo.train.checkpoint``), CSV metrics and progress (``zoo.train.metrics``) are the shared pieces. The
split is a seeded shuffle 80/10/10 of the scanpaths (``--split-by display`` keeps displays disjoint).
``--data synthetic-coins`` trains on the seeded synthetic coins task of ``zoo.data.scanpath``.

``zoo scanpath convert`` turns a checkpoint of the authors' code (HKUST-NISL/oat_eccv24: their Lightning
``.ckpt`` plus the position table ``.npy`` it was trained with) into a file of the same format as ``train``'s
``model_best.pt``, so ``eval`` / ``predict`` and ``zoo.create_model('oat', checkpoint_path=...)`` take it.
"""

from __future__ import annotations

import argparse
import json
import math
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from .._cli_errors import non_negative_int, parse_json_mapping, positive_int
from .._io import atomic_write_text, load_state_dict_checked, safe_load
from ..data.scanpath import (
    ScanpathData,
    ScanpathDataset,
    collate_scanpaths,
    read_scanpaths,
    synthetic_coins_search,
)
from .checkpoint import CheckpointManager, atomic_save, capture_rng_state, prepare_run_folder, restore_rng_state
from .metrics import MetricLogger, Progress, rewind_csv

__all__ = [
    "BEHAVIOUR_STATS",
    "add_cli",
    "behaviour_delta",
    "behaviour_stats",
    "edit_distance",
    "evaluate_scanpaths",
    "multimatch",
    "predict",
    "random_scanpaths",
    "sequence_score",
    "split_scanpaths",
    "train_scanpath_model",
]

BEHAVIOUR_STATS = ("target_found", "length", "search", "refixation", "revisit")
RUN_LOGS = ("metrics.csv", "model_best.pt")  # what --overwrite removes besides the checkpoints


# ---------------------------------------------------------------------------------------------- metrics


def sequence_score(a: list[int], b: list[int]) -> float:
    """Needleman–Wunsch score (match 1, mismatch 0, gap 0) / max(len(a), len(b)); 1 = identical."""
    if not a and not b:
        return 1.0
    # with mismatch and gap both 0 the optimal alignment score is the longest common subsequence
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(max(prev[j] + (x == y), prev[j + 1], cur[j]))
        prev = cur
    return prev[-1] / max(len(a), len(b))


def edit_distance(a: list[int], b: list[int], normalised: bool = False) -> float:
    """Levenshtein distance between two object sequences (optionally / the longer length)."""
    prev = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        cur = [i]
        for j, y in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (x != y)))
        prev = cur
    dist = float(prev[-1])
    return dist / max(1, len(a), len(b)) if normalised else dist


def multimatch(a: list[int], b: list[int], centres: np.ndarray, screen: tuple[float, float]) -> dict[str, float]:
    """MultiMatch vector / direction / length / position similarity on object centres (pixels).

    Args:
        a, b: object-index sequences.
        centres: (P, 2) object centres (x, y) in pixels.
        screen: (width, height) in pixels.
    """
    keys = ("vector", "direction", "length", "position")
    try:
        import multimatch_gaze
    except ImportError:
        return dict.fromkeys(keys, float("nan"))

    def fixations(seq: list[int]) -> np.ndarray:
        xy = centres[np.asarray(seq, dtype=int)]
        return np.rec.fromarrays(
            [xy[:, 0], xy[:, 1], np.full(len(seq), 0.25)], names=["start_x", "start_y", "duration"]
        )

    if len(a) < 3 or len(b) < 3:
        return dict.fromkeys(keys, float("nan"))
    result = multimatch_gaze.docomparison(fixations(a), fixations(b), screensize=list(screen))
    return {k: float(v) for k, v in zip(keys, result[:4])}


def behaviour_stats(seq: list[int], target: int) -> dict[str, float]:
    """The five behavioural statistics of one scanpath."""
    n = len(seq)
    if n == 0:
        return dict(target_found=0.0, length=0.0, search=0.0, refixation=0.0, revisit=0.0)
    seen: set[int] = set()
    first = refix = revisit = 0
    for i, obj in enumerate(seq):
        if obj not in seen:
            first += 1
        elif i > 0 and seq[i - 1] == obj:
            refix += 1
        else:
            revisit += 1
        seen.add(obj)
    return dict(
        target_found=float(seq[-1] == target),
        length=float(n),
        search=first / n,
        refixation=refix / n,
        revisit=revisit / n,
    )


def _mean_stats(rows: list[dict[str, float]]) -> dict[str, float]:
    return {k: float(np.mean([r[k] for r in rows])) for k in BEHAVIOUR_STATS}


def behaviour_delta(model: dict[str, float], human: dict[str, float]) -> float:
    """Mean over the five statistics of |model - human| / human (absolute difference where human = 0)."""
    terms = [abs(model[k] - human[k]) / (human[k] if human[k] else 1.0) for k in BEHAVIOUR_STATS]
    return float(np.mean(terms))


def random_scanpaths(num_objects: list[int], lengths: list[int], seed: int = 0) -> list[list[int]]:
    """Random-fixation baseline: per display, uniform objects, a length drawn from ``lengths``."""
    rng = random.Random(seed)
    return [[rng.randrange(n) for _ in range(rng.choice(lengths))] for n in num_objects]


def _centres(data: ScanpathData, display_id: str) -> np.ndarray:
    return np.array([((o.box[0] + o.box[2]) / 2, (o.box[1] + o.box[3]) / 2) for o in data.displays[display_id].objects])


def _screen(data: ScanpathData, display_id: str) -> tuple[float, float]:
    image = data.displays[display_id].image
    if isinstance(image, np.ndarray):
        return float(image.shape[1]), float(image.shape[0])
    from PIL import Image

    with Image.open(image) as im:
        return float(im.size[0]), float(im.size[1])


def evaluate_scanpaths(
    data: ScanpathData, predictions: list[list[int]], references: list, use_multimatch: bool = True
) -> dict[str, float]:
    """Mean SS, edit distance, MultiMatch and the behavioural delta of ``predictions`` vs ``references``.

    Args:
        predictions: one object-index list per reference scanpath.
        references: the ``Scanpath`` records (display, fixations).
    """
    ss, ed, mm, model_stats, human_stats = [], [], [], [], []
    screens: dict[str, tuple[float, float]] = {}
    for pred, ref in zip(predictions, references):
        target = data.displays[ref.display].target_index
        ss.append(sequence_score(pred, ref.fixations))
        ed.append(edit_distance(pred, ref.fixations))
        model_stats.append(behaviour_stats(pred, target))
        human_stats.append(behaviour_stats(ref.fixations, target))
        if use_multimatch:
            if ref.display not in screens:
                screens[ref.display] = _screen(data, ref.display)
            mm.append(multimatch(pred, ref.fixations, _centres(data, ref.display), screens[ref.display]))
    model_mean, human_mean = _mean_stats(model_stats), _mean_stats(human_stats)
    out = dict(sequence_score=float(np.mean(ss)), edit_distance=float(np.mean(ed)))
    out["behaviour_delta"] = behaviour_delta(model_mean, human_mean)
    out.update({f"model_{k}": v for k, v in model_mean.items()})
    out.update({f"human_{k}": v for k, v in human_mean.items()})
    if mm:
        for key in ("vector", "direction", "length", "position"):
            values = [m[key] for m in mm if not math.isnan(m[key])]
            out[f"multimatch_{key}"] = float(np.mean(values)) if values else float("nan")
    return out


# ---------------------------------------------------------------------------------------------- training


def split_scanpaths(
    data: ScanpathData, seed: int = 0, by: str = "scanpath", fractions=(0.8, 0.1, 0.1)
) -> dict[str, list]:
    """Seeded shuffled split of the scanpaths (``by='display'`` keeps displays disjoint)."""
    rng = random.Random(seed)
    if by == "display":
        ids = sorted(data.displays)
        rng.shuffle(ids)
        n_tr, n_va = int(fractions[0] * len(ids)), int(fractions[1] * len(ids))
        parts = {"train": set(ids[:n_tr]), "val": set(ids[n_tr : n_tr + n_va]), "test": set(ids[n_tr + n_va :])}
        return {k: [s for s in data.scanpaths if s.display in v] for k, v in parts.items()}
    paths = list(data.scanpaths)
    rng.shuffle(paths)
    n_tr, n_va = int(fractions[0] * len(paths)), int(fractions[1] * len(paths))
    return {"train": paths[:n_tr], "val": paths[n_tr : n_tr + n_va], "test": paths[n_tr + n_va :]}


def predict(
    model: nn.Module,
    dataset: ScanpathDataset,
    display_ids: list[str],
    max_len: int,
    sample: bool = False,
    num_samples: int = 1,
    batch_size: int = 32,
    seed: int = 0,
) -> list[list[list[int]]]:
    """Per display: ``num_samples`` generated scanpaths (object indices)."""
    model.eval()
    generator = torch.Generator().manual_seed(seed)
    out = []
    for start in range(0, len(display_ids), batch_size):
        items = [dataset.display_item(d) for d in display_ids[start : start + batch_size]]
        batch = collate_scanpaths(items, model.max_objects)
        seqs = model.generate(
            batch["crops"], batch["positions"], batch["target"], batch["object_mask"], max_len=max_len,
            sample=sample, num_samples=num_samples, generator=generator,
        )  # fmt: skip
        out += [seqs[i * num_samples : (i + 1) * num_samples] for i in range(len(items))]
    return out


def train_scanpath_model(
    model: nn.Module,
    data: ScanpathData,
    splits: dict[str, list],
    epochs: int = 500,
    batch_size: int = 20,
    lr: float = 1e-4,
    clip: float = 1.0,
    patience: int = 30,
    seed: int = 1234,
    out_dir: str | Path | None = None,
    resume: str = "",
    eval_every: int = 1,
    verbose: bool = True,
    monitor: str = "behaviour_delta",
    overwrite: bool = False,
) -> dict[str, Any]:
    """Teacher-forced cross-entropy training with early stopping on the validation behavioural delta.

    ``monitor='loss'`` selects and stops on the teacher-forced validation loss instead: the behavioural
    delta of greedy decodes is the paper's monitor but is noisy on a few validation scanpaths and favours
    under-trained checkpoints (greedy decoding never refixates, so the refixation term is flat). Returns the
    validation metrics of the best epoch and the per-epoch history; the best weights are loaded back into
    ``model`` at the end. ``finished`` in the result says the run had already ended before this call (a
    ``resume='auto'`` of a finished run trains nothing). ``overwrite`` starts over in an ``out_dir`` that
    holds another run.
    """
    if monitor not in ("behaviour_delta", "loss"):
        raise ValueError(f"monitor must be 'behaviour_delta' or 'loss', not {monitor!r}")
    torch.manual_seed(seed)
    random.seed(seed)
    if not splits["train"]:
        raise ValueError(
            f"no training scanpaths ({sum(len(v) for v in splits.values())} in all, split 80/10/10): add scanpaths"
        )
    dataset = ScanpathDataset(data, model.crop_size, splits["train"])
    val_refs = splits["val"]
    max_len = max(len(s.fixations) for s in splits["train"]) + 1
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    manager = CheckpointManager(out_dir, keep_last=1, mode="min") if out_dir is not None else None
    if manager is not None:
        prepare_run_folder(out_dir, manager, resume, overwrite, RUN_LOGS)
    start_epoch, best, best_state, since_best, history = 0, math.inf, None, 0, []
    best_delta = math.inf
    state = manager.resolve_resume(resume) if manager is not None and resume else None
    steps = math.ceil(len(dataset) / batch_size)
    if out_dir is not None and resume:  # rows logged after the resumed checkpoint are logged again
        rewind_csv(Path(out_dir) / "metrics.csv", (state["epoch"] + 1) * steps if state else 0)
    logger = MetricLogger(out_dir) if out_dir is not None else None
    finished = state is not None and (state["since_best"] >= patience or state["epoch"] + 1 >= epochs)
    if state is not None:
        load_state_dict_checked(model, state["model"], f"checkpoint {state['path']}")
        optimizer.load_state_dict(state["optimizer"])
        restore_rng_state(state["rng"])
        start_epoch, best, since_best, history = (
            state["epoch"] + 1,
            state["best"],
            state["since_best"],
            state["history"],
        )
        best_state, best_delta = state["best_state"], state.get("best_delta", state["best"])
    for epoch in range(start_epoch, 0 if finished else epochs):
        model.train()
        order = torch.randperm(len(dataset)).tolist()
        progress = Progress(steps, f"oat {epoch + 1}/{epochs}", enabled=verbose)
        loss_sum = 0.0
        for step in range(steps):
            batch = collate_scanpaths(
                [dataset[i] for i in order[step * batch_size : (step + 1) * batch_size]], model.max_objects
            )
            loss = model.loss(batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), clip)
            optimizer.step()
            loss_sum += loss.item()
            progress.update(loss=loss.item())
        progress.close()
        row: dict[str, Any] = dict(epoch=epoch, train_loss=loss_sum / steps)
        if val_refs and ((epoch + 1) % eval_every == 0 or epoch + 1 == epochs):
            preds = predict(model, dataset, [s.display for s in val_refs], max_len)
            metrics = evaluate_scanpaths(data, [p[0] for p in preds], val_refs, use_multimatch=False)
            row.update(val_sequence_score=metrics["sequence_score"], val_behaviour_delta=metrics["behaviour_delta"])
            row["val_loss"] = _teacher_forced_loss(model, data, val_refs, batch_size)
            if row[f"val_{monitor}"] < best:
                best, since_best = row[f"val_{monitor}"], 0
                best_delta = metrics["behaviour_delta"]
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            else:
                since_best += eval_every
        history.append(row)
        if logger is not None:
            logger.log(row, step=(epoch + 1) * steps)
        if manager is not None:
            state = dict(model=model.state_dict(), optimizer=optimizer.state_dict(), rng=capture_rng_state(),
                         epoch=epoch, best=best, best_delta=best_delta, since_best=since_best, history=history,
                         best_state=best_state, max_len=max_len)  # fmt: skip
            manager.save(state, step=epoch, metric=row.get(f"val_{monitor}"))
        if since_best >= patience:
            break
    if logger is not None:
        logger.close()
    if best_state is not None:
        model.load_state_dict(best_state)
    return dict(
        best_val_behaviour_delta=best_delta,
        best_val=best,
        monitor=monitor,
        history=history,
        max_len=max_len,
        finished=finished,
    )


@torch.no_grad()
def _teacher_forced_loss(model: nn.Module, data: ScanpathData, refs: list, batch_size: int) -> float:
    """Mean teacher-forced cross-entropy over ``refs`` (eval mode)."""
    model.eval()
    dataset = ScanpathDataset(data, model.crop_size, refs)
    total = 0.0
    for start in range(0, len(refs), batch_size):
        items = [dataset[i] for i in range(start, min(start + batch_size, len(refs)))]
        total += float(model.loss(collate_scanpaths(items, model.max_objects))) * len(items)
    return total / max(1, len(refs))


# ---------------------------------------------------------------------------------------------- cli


def _load_data(args: argparse.Namespace) -> ScanpathData:
    if args.data == "synthetic-coins":
        return synthetic_coins_search(args.synthetic_displays, seed=args.seed)
    return read_scanpaths(args.data, args.scanpaths)


def _build_model(args: argparse.Namespace, data: ScanpathData) -> nn.Module:
    import zoo

    kwargs = dict(
        grid=data.grid, max_objects=data.max_objects, **parse_json_mapping(args.model_kwargs, "--model-kwargs")
    )
    return zoo.create_model(args.model, **kwargs)


def _cmd_train(args: argparse.Namespace) -> int:
    data = _load_data(args)
    splits = split_scanpaths(data, args.seed, args.split_by)
    torch.manual_seed(args.seed)
    model = _build_model(args, data)
    result = train_scanpath_model(
        model, data, splits, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, patience=args.patience,
        seed=args.seed, out_dir=args.out, resume=args.resume, monitor=args.monitor, overwrite=args.overwrite,
    )  # fmt: skip
    out = Path(args.out)
    if result["finished"] and (out / "model_best.pt").is_file():
        print(f"run in {out} already finished: nothing to do; weights in {out / 'model_best.pt'}")
        return 0
    atomic_save(dict(model=model.state_dict(), model_kwargs=_saved_kwargs(model), max_len=result["max_len"],
                     name=args.model), out / "model_best.pt")  # fmt: skip
    best = result["best_val_behaviour_delta"]
    print(f"best validation behavioural delta {best:.4f}; weights in {out / 'model_best.pt'}")
    return 0


def _saved_kwargs(model: nn.Module) -> dict[str, Any]:
    """The model's constructor keywords as a file stores them: the table file is left out (its rows are the
    ``pos_table`` entry of the state dict, so the file need not exist where the model is rebuilt)."""
    return {k: v for k, v in model._model_args.items() if k != "pos_table_file"}


def _cmd_convert(args: argparse.Namespace) -> int:
    import zoo

    kwargs = dict(grid=tuple(args.grid), **parse_json_mapping(args.model_kwargs, "--model-kwargs"))
    # the factory's checkpoint route: read without pickle, Lightning's state_dict unwrapped, the family's
    # checkpoint_filter_fn maps the authors' keys and adds the table, then a strict load
    model = zoo.create_model(args.model, checkpoint_path=args.checkpoint, pos_table_file=args.pos_table, **kwargs)
    out = Path(args.out)
    max_len = args.max_len or model.max_len
    atomic_save(dict(model=model.state_dict(), model_kwargs=_saved_kwargs(model), max_len=max_len, name=args.model,
                     source=str(args.checkpoint)), out)  # fmt: skip
    print(f"converted {args.checkpoint} (+ {args.pos_table}) -> {out}; generation cap max_len={max_len}")
    return 0


def _load_trained(args: argparse.Namespace) -> tuple[nn.Module, int]:
    import zoo

    ckpt = safe_load(args.checkpoint)  # weights_only: a file handed in never runs code
    if not isinstance(ckpt, dict) or not {"model", "model_kwargs", "max_len"} <= set(ckpt):
        raise ValueError(
            f"--checkpoint {args.checkpoint} is not a model_best.pt of `zoo scanpath train` (it needs 'model', "
            "'model_kwargs' and 'max_len' entries)"
        )
    if not isinstance(ckpt["model_kwargs"], dict):
        raise ValueError(f"--checkpoint {args.checkpoint}: 'model_kwargs' is not a mapping")
    model = zoo.create_model(str(ckpt.get("name", "oat")), **ckpt["model_kwargs"])
    load_state_dict_checked(model, ckpt["model"], f"checkpoint {args.checkpoint}")
    return model.eval(), int(ckpt["max_len"])


def _cmd_eval(args: argparse.Namespace) -> int:
    data = _load_data(args)
    refs = split_scanpaths(data, args.seed, args.split_by)[args.split] if args.split != "all" else data.scanpaths
    model, max_len = _load_trained(args)
    dataset = ScanpathDataset(data, model.crop_size, refs)
    preds = predict(model, dataset, [s.display for s in refs], max_len)
    results = {"oat_greedy": evaluate_scanpaths(data, [p[0] for p in preds], refs)}
    lengths = [len(s.fixations) for s in data.scanpaths]
    rand = random_scanpaths([len(data.displays[s.display].objects) for s in refs], lengths, seed=args.seed)
    results["random"] = evaluate_scanpaths(data, rand, refs)
    print(json.dumps(results, indent=2))
    if args.out:
        atomic_write_text(args.out, json.dumps(results, indent=2))
    return 0


def _cmd_predict(args: argparse.Namespace) -> int:
    data = _load_data(args)
    model, max_len = _load_trained(args)
    ids = sorted(data.displays)
    dataset = ScanpathDataset(data, model.crop_size, [])
    preds = predict(
        model, dataset, ids, args.max_len or max_len, sample=args.samples > 0, num_samples=max(1, args.samples)
    )
    rows = [
        dict(display=d, subject=f"oat{j}", fixations=[data.displays[d].objects[i].id for i in seq])
        for d, seqs in zip(ids, preds)
        for j, seq in enumerate(seqs)
    ]
    text = json.dumps({"scanpaths": rows}, indent=1)
    if args.out:
        atomic_write_text(args.out, text)
    else:
        print(text)
    return 0


def add_cli(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``zoo scanpath train|eval|predict|convert`` to the ``zoo`` command's sub-parsers."""
    p = subparsers.add_parser("scanpath", help="train, evaluate, run or convert a scanpath model (OAT)")
    verbs = p.add_subparsers(dest="scanpath_command", required=True)

    def common(q: argparse.ArgumentParser) -> None:
        q.add_argument("--data", required=True, help="displays JSON (see zoo.data.scanpath) or 'synthetic-coins'")
        q.add_argument("--scanpaths", default=None, help="scanpaths CSV (display,subject,fixations[,durations])")
        q.add_argument(
            "--synthetic-displays", type=positive_int, default=300, help="displays of the synthetic-coins task"
        )
        q.add_argument("--seed", type=int, default=1234, help="seed of the split and the training")
        q.add_argument("--split-by", default="scanpath", choices=["scanpath", "display"], help="80/10/10 split unit")

    q = verbs.add_parser("train", help="teacher-forced training with early stopping on the behavioural delta")
    common(q)
    q.add_argument("--model", default="oat", help="scanpath entry (zoo list --kind scanpath)")
    q.add_argument("--model-kwargs", default="{}", help="JSON kwargs, e.g. '{\"crop_size\": [150, 93]}'")
    q.add_argument("--out", default="scanpath_run", help="run folder: checkpoints, metrics.csv, model_best.pt")
    q.add_argument("--epochs", type=positive_int, default=500, help="maximum epochs (paper: 500)")
    q.add_argument("--batch-size", type=positive_int, default=20, help="batch (paper: 20)")
    q.add_argument("--lr", type=float, default=1e-4, help="Adam lr (paper: 1e-4, constant)")
    q.add_argument("--patience", type=positive_int, default=30, help="early-stopping patience in epochs (paper: 30)")
    q.add_argument("--monitor", default="behaviour_delta", choices=["behaviour_delta", "loss"],
                   help="early-stopping and best-checkpoint value (paper: behaviour_delta)")  # fmt: skip
    q.add_argument("--resume", default="", help="'' fresh, 'auto' latest checkpoint in --out, or a path")
    q.add_argument("--overwrite", action="store_true", help="start over in an --out holding another run (deletes it)")
    q.set_defaults(func=_cmd_train)

    q = verbs.add_parser("eval", help="SS, edit distance, MultiMatch, behavioural delta vs a random baseline")
    common(q)
    q.add_argument("--checkpoint", required=True, help="model_best.pt from `zoo scanpath train`")
    q.add_argument("--split", default="test", choices=["train", "val", "test", "all"], help="scanpaths to score")
    q.add_argument("--out", default=None, help="write the metrics JSON here")
    q.set_defaults(func=_cmd_eval)

    q = verbs.add_parser("predict", help="greedy (or --samples N sampled) scanpaths for every display")
    common(q)
    q.add_argument("--checkpoint", required=True, help="model_best.pt from `zoo scanpath train`")
    q.add_argument("--samples", type=non_negative_int, default=0, help="0: greedy; N: N sampled scanpaths per display")
    q.add_argument("--max-len", type=int, default=None, help="maximum fixations (default: the training maximum)")
    q.add_argument("--out", default=None, help="write the scanpaths JSON here (default: stdout)")
    q.set_defaults(func=_cmd_predict)

    q = verbs.add_parser(
        "convert", help="the authors' Lightning checkpoint + position table -> a zoo file (model_best.pt format)"
    )
    q.add_argument("--checkpoint", required=True, help="the authors' .ckpt (HKUST-NISL/oat_eccv24, run.py)")
    q.add_argument("--pos-table", required=True,
                   help="the table it was trained with: their src/model/amazon_learned_random_PE.npy (Amazon) or "
                   "learned_PE_random_2.npy (wine, yogurt)")  # fmt: skip
    q.add_argument("--grid", type=positive_int, nargs=2, default=[6, 14], metavar=("ROWS", "COLS"),
                   help="the display grid (Amazon 6 14, yogurt 3 9, wine 2 11)")  # fmt: skip
    q.add_argument("--model", default="oat", help="scanpath entry (zoo list --kind scanpath)")
    q.add_argument("--model-kwargs", default="{}", help="JSON kwargs besides the grid (their sizes are the defaults)")
    q.add_argument("--max-len", type=positive_int, default=None,
                   help="generation cap stored for eval / predict: their longest training scanpath (not in the "
                   "checkpoint; default: the model's max_len)")  # fmt: skip
    q.add_argument("--out", required=True, help="the zoo file to write (atomically)")
    q.set_defaults(func=_cmd_convert)
    return p
