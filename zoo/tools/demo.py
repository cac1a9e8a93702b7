"""``make demo``: train a BiFormer on real embedded data on the CPU, then validate its checkpoint.

What it does, plainly:

1. Picks the data: Fashion-MNIST from Debian's ``dataset-fashion-mnist`` when installed (``make demo`` installs
   it when run as root), else scikit-learn's 8x8 digits. Nothing is downloaded.
2. Trains ``biformer_tiny``'s architecture shrunk through ``create_model`` kwargs (1.25 M parameters; bi-level
   routing attention on a 4x4 region grid at stage 1) from random weights with ``zoo train``'s loop and the
   recipe ``zoo/train/recipes/demo_<data>.yaml``: one pass over 24,000 Fashion-MNIST images (or 6 epochs of
   digits), AdamW + cosine, a progress bar, one compute thread plus one loader process, stopped cleanly at
   the recipe's time limit (210 s of training) if the machine is slower than expected.
3. Prints the test accuracy (targets: >= 85 % on Fashion-MNIST's 10,000 test images, >= 90 % on the 359
   held-out digits) and writes ``runs/demo/``: ``checkpoints/ckpt_best.pt``, ``metrics.csv``, ``steps.csv``,
   ``curves.png`` (loss and accuracy), ``config.yaml``.
4. Validates the checkpoint with ``zoo validate`` (a fresh model, weights from the file, the checkpoint's
   preprocessing) and appends the row to ``runs/demo/results.csv`` in timm's results schema.

It is not an ImageNet result: the model is tiny and trains for minutes on 28-pixel gray images.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from zoo.data.embedded import available_embedded
from zoo.train.config import Config, apply_overrides, load_recipe
from zoo.train.loop import train

__all__ = ["run_demo"]

TARGETS = {"fashion_mnist": 85.0, "digits": 90.0}


def run_demo(data: str = "auto", out: str | Path = "runs/demo", bench_iters: int | None = None) -> int:
    """Run the demo; returns 0 when the accuracy target is met, 1 otherwise.

    Args:
        data: ``'fashion_mnist'``, ``'digits'`` or ``'auto'`` (Fashion-MNIST when installed, else digits).
        out: run folder.
        bench_iters: ignored (kept for the former tour's ``--iters`` flag).
    """
    start = time.perf_counter()
    print("zoo demo: train a BiFormer on real embedded data on the CPU, then validate its checkpoint.\n", flush=True)
    print(__doc__.split("\n\n", 1)[1], flush=True)
    here = available_embedded()
    if data == "auto":
        data = "fashion_mnist" if "fashion_mnist" in here else "digits"
        if data == "digits":
            print("Fashion-MNIST is not installed (apt-get install -y dataset-fashion-mnist, as root): using digits")
    cfg = apply_overrides(Config(), load_recipe(f"demo_{data}"), origin=f"recipe demo_{data}")
    cfg.log.out = str(out)
    cfg.checkpoint.resume = ""
    cfg.checkpoint.overwrite = True  # a fresh run each time: the demo never resumes an older one
    checkpoints = Path(out) / "checkpoints"
    (Path(out) / "results.csv").unlink(missing_ok=True)  # zoo validate appends to it

    metrics = train(cfg)
    acc, target = metrics["val_acc1"], TARGETS[data]
    verdict = "meets" if acc >= target else "MISSES"
    print(
        f"\ntest accuracy on {data}: {acc:.2f}% (top-5 {metrics['val_acc5']:.2f}%), {verdict} the {target:.0f}% "
        f"target; {metrics['train_time_s']:.0f} s of training, data loading "
        f"{100 * metrics['data_time_frac']:.1f}% of step time"
    )
    print(
        f"wrote {checkpoints / 'ckpt_best.pt'}, {Path(out) / 'metrics.csv'}, {metrics.get('curves', '(no curves.png)')}"
    )

    # validate the checkpoint through the `zoo validate` command line
    from zoo.train.cli import add_cli

    argv = [
        "validate", cfg.model.name, "--checkpoint", str(checkpoints / "ckpt_best.pt"), "--data", data,
        "--workers", "1", "--batch-size", "256", "--results-file", str(Path(out) / "results.csv"),
    ]  # fmt: skip
    print("\n$ zoo " + " ".join(argv), flush=True)
    parser = argparse.ArgumentParser(prog="zoo")
    add_cli(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    rc = args.func(args)
    print(f"\ndemo finished in {time.perf_counter() - start:.0f} s", flush=True)
    return 0 if rc == 0 and acc >= target else 1


if __name__ == "__main__":
    sys.exit(run_demo(*sys.argv[1:2]))
