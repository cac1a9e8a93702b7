"""Command line of training: ``zoo train`` / ``zoo validate`` and ``python -m zoo.train`` / ``torchrun -m zoo.train``.

``add_cli(subparsers)`` adds both verbs to the ``zoo`` command's argparse sub-parsers; ``main(argv)`` is the
``python -m zoo.train`` entry point (the same flags as ``zoo train``).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
from collections.abc import Sequence

import yaml

from .._cli_errors import ZooArgumentParser, non_negative_int, positive_int, run_reporting_errors, split_debug_flag
from .config import add_config_arguments, config_from_args

TRAIN_HELP = "train a classifier (torchrun for several processes); flags override a --config YAML recipe"
VALIDATE_HELP = "top-1/top-5, loss and img/s of a checkpoint; rows in timm's results-imagenet.csv schema"


def _cmd_train(args: argparse.Namespace) -> int:
    """Errors propagate: ``zoo``'s main (or ``main`` below) prints them as one line, exit code 2."""
    from .loop import train

    cfg = config_from_args(args)
    metrics = train(cfg)
    if metrics and os.environ.get("RANK", "0") == "0":
        print(json.dumps(metrics, default=str))
    if metrics.get("stopped_by"):  # checkpointed and left on a signal: the shell's code for it (143 = SIGTERM)
        return 128 + int(getattr(signal, metrics["stopped_by"], signal.SIGTERM))
    return 0


def _cmd_validate(args: argparse.Namespace) -> int:
    from .validate import validate

    model_kwargs = yaml.safe_load(args.model_kwargs) if args.model_kwargs else None
    if model_kwargs is not None and not isinstance(model_kwargs, dict):
        raise ValueError(f"--model-kwargs {args.model_kwargs!r} must be a YAML mapping, e.g. '{{n_win: 4}}'")
    result = validate(
        args.name,
        args.checkpoint,
        args.data,
        split=args.split,
        batch_size=args.batch_size,
        num_workers=args.workers,
        img_size=args.img_size,
        crop_pct=args.crop_pct,
        interpolation=args.interpolation,
        use_ema=args.use_ema,
        device=args.device,
        limit=args.limit,
        results_file=args.results_file,
        model_kwargs=model_kwargs,
        pretrained=args.pretrained,
    )
    print(
        f"{result.model}: top-1 {result.top1:.3f}%  top-5 {result.top5:.3f}%  loss {result.loss:.4f}  "
        f"{result.img_per_s:.1f} img/s  ({result.count} images, {result.img_size}px, crop {result.crop_pct}, "
        f"{result.interpolation})"
    )
    if args.results_file:
        print(f"wrote {args.results_file}")
    return 0


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)
    parser.set_defaults(func=_cmd_train)


def add_validate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", help="registry name of the model")
    parser.add_argument("--checkpoint", default=None, help="zoo train checkpoint or a timm/plain state dict")
    parser.add_argument("--pretrained", action="store_true", help="evaluate the registry's pretrained weights")
    parser.add_argument("--data", required=True, help="fashion_mnist | digits, or a folder (ROOT/val/<class>/*)")
    parser.add_argument("--split", default="val", help="sub-folder of --data to evaluate")
    parser.add_argument("--batch-size", "-b", type=positive_int, default=64, help="batch size")
    parser.add_argument("--workers", type=non_negative_int, default=2, help="DataLoader workers")
    parser.add_argument(
        "--img-size", type=non_negative_int, default=0, help="input size; 0 = checkpoint / pretrained_cfg"
    )
    parser.add_argument("--crop-pct", type=float, default=0.0, help="centre crop; 0 = checkpoint / pretrained_cfg")
    parser.add_argument("--interpolation", default="", help="resize interpolation; '' = checkpoint / pretrained_cfg")
    parser.add_argument("--use-ema", action="store_true", help="evaluate the checkpoint's EMA weights")
    parser.add_argument("--device", default="", help="cpu or cuda; '' = cuda when available")
    parser.add_argument("--limit", type=non_negative_int, default=0, help="evaluate only the first N images (0 = all)")
    parser.add_argument("--model-kwargs", default="", help="extra create_model kwargs (YAML mapping)")
    parser.add_argument("--results-file", default=None, help="CSV to append a results-imagenet.csv row to")
    parser.set_defaults(func=_cmd_validate)


def add_cli(subparsers: argparse._SubParsersAction) -> None:
    """Add ``train`` and ``validate`` to the ``zoo`` command (``sub = parser.add_subparsers(...)``)."""
    add_train_arguments(subparsers.add_parser("train", help=TRAIN_HELP, description=TRAIN_HELP))
    add_validate_arguments(subparsers.add_parser("validate", help=VALIDATE_HELP, description=VALIDATE_HELP))


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m zoo.train`` / ``torchrun -m zoo.train``: the flags of ``zoo train``; errors as one line."""
    argv, debug = split_debug_flag(argv)
    parser = ZooArgumentParser(prog="zoo.train", description=TRAIN_HELP)
    add_train_arguments(parser)
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # usage errors (already printed as one line) and --help
        return exit_.code if isinstance(exit_.code, int) else 0
    return run_reporting_errors(lambda: args.func(args), "zoo.train", debug)
