"""``zoo det train CONFIG`` and ``zoo seg train CONFIG``: mmengine's Runner on an mmdet / mmseg config.

Single process (CPU or one GPU)::

    zoo det train zoo/detection/configs/maskrcnn_biformer_small_1x_coco.py --work-dir runs/mrcnn_bif_s

Several GPUs (one process per GPU; mmengine's ``pytorch`` launcher reads torchrun's environment)::

    torchrun --nproc_per_node 8 -m zoo.cli det train CONFIG --launcher pytorch
    torchrun --nnodes 2 --nproc_per_node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 \\
        -m zoo.cli seg train CONFIG --launcher pytorch

Without a compiled mmcv, ``--mmcv-lite`` (or ``ZOO_MMCV_COMPAT=1``) runs on ``mmcv-lite`` through
``zoo.mm.compat``. Everything mm is imported when a command runs, never when the parser is built.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

__all__ = ["add_cli", "prepare_config"]

_TASKS = {
    "det": ("zoo.detection.mmdet", "mmdet", "detection / instance segmentation (mmdet 3.x)"),
    "seg": ("zoo.segmentation.mmseg", "mmseg", "semantic segmentation (mmsegmentation 1.x)"),
}


def _parse_cfg_options(items: list[str] | None) -> dict[str, Any]:
    """``['a.b=1', 'c=[1,2]']`` -> ``{'a.b': 1, 'c': [1, 2]}`` with mmengine's own ``DictAction`` rules."""
    if not items:
        return {}
    from mmengine.config import DictAction

    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--cfg-options", nargs="+", action=DictAction)
    return dict(parser.parse_args(["--cfg-options", *items]).cfg_options or {})


def prepare_config(task: str, args: argparse.Namespace) -> Any:
    """The mmengine ``Config`` that ``zoo <task> train`` runs: file + ``--cfg-options`` + work dir, launcher, resume.

    Also imports the adapter (registers ``ZooBackbone``; installs the mmcv-lite layer with ``--mmcv-lite``),
    switches an ``AmpOptimWrapper`` to fp32 on machines without CUDA, and lets mmengine < 0.11 load its own
    checkpoints on torch >= 2.6 when resuming or loading (``zoo.mm.compat.trust_local_checkpoints``).
    """
    import importlib

    import torch

    from zoo.mm import compat

    module, scope, _ = _TASKS[task]
    if getattr(args, "mmcv_lite", False):
        compat.install()
    importlib.import_module(module)
    from mmengine.config import Config

    path = Path(args.config)
    if not path.is_file():
        where = "detection" if task == "det" else "segmentation"
        raise FileNotFoundError(f"config {args.config} not found; zoo's configs are in zoo/{where}/configs/")
    cfg = Config.fromfile(str(path))
    (cfg.get("visualizer") or {}).pop("name", None)  # per-Runner name: mmengine reuses a named one, and its log dir
    cfg.merge_from_dict(_parse_cfg_options(args.cfg_options))
    cfg.setdefault("default_scope", scope)
    cfg.launcher = args.launcher
    if args.work_dir:
        cfg.work_dir = args.work_dir
    elif cfg.get("work_dir") is None:
        cfg.work_dir = str(Path("work_dirs") / path.stem)
    if args.resume == "auto":
        cfg.resume, cfg.load_from = True, None
    elif args.resume:
        cfg.resume, cfg.load_from = True, args.resume
    optim = cfg.get("optim_wrapper", {})
    if optim.get("type") == "AmpOptimWrapper" and (args.amp == "off" or not torch.cuda.is_available()):
        # mmengine's AmpOptimWrapper needs CUDA; the recipes' fp16 is a speed setting, fp32 trains the same model
        optim.type = "OptimWrapper"
        optim.pop("loss_scale", None)
        if args.amp != "off":
            print("zoo: no CUDA device: training in fp32 (OptimWrapper) instead of the config's AmpOptimWrapper")
    elif args.amp == "on" and optim.get("type", "OptimWrapper") == "OptimWrapper":
        optim.type = "AmpOptimWrapper"
        optim.setdefault("loss_scale", "dynamic")
    if cfg.get("resume") or cfg.get("load_from"):
        if compat.trust_local_checkpoints():
            print("zoo: mmengine < 0.11 on torch >= 2.6: loading checkpoints with torch.load(weights_only=False)")
    return cfg


def _cmd_train(args: argparse.Namespace) -> int:
    from mmengine.runner import Runner

    cfg = prepare_config(args.task, args)
    runner = Runner.from_cfg(cfg)
    runner.train()
    return 0


def add_cli(subparsers: argparse._SubParsersAction) -> None:
    """Add ``zoo det train`` and ``zoo seg train`` to the ``zoo`` command's sub-parsers."""
    for task, (_, _, what) in _TASKS.items():
        p = subparsers.add_parser(task, help=f"{what} with zoo backbones (needs attention-zoo[mm-lite] or [mm])")
        verbs = p.add_subparsers(dest=f"{task}_command", required=True)
        t = verbs.add_parser("train", help=f"train an mm{task} config with mmengine's Runner (torchrun for multi-GPU)")
        t.add_argument(
            "config",
            help=f"mmengine config file, e.g. zoo/{'detection' if task == 'det' else 'segmentation'}/configs/...",
        )
        t.add_argument("--work-dir", default=None, help="logs and checkpoints (default: work_dirs/<config name>)")
        t.add_argument(
            "--cfg-options",
            nargs="+",
            default=None,
            metavar="KEY=VALUE",
            help="override config entries, e.g. train_dataloader.batch_size=4 model.backbone.pretrained=None",
        )
        t.add_argument(
            "--launcher",
            default="none",
            choices=["none", "pytorch", "slurm", "mpi"],
            help="'pytorch' under torchrun (one process per GPU); 'none' for one process",
        )
        t.add_argument(
            "--resume",
            nargs="?",
            const="auto",
            default=None,
            help="resume: alone = the latest checkpoint in the work dir, or a checkpoint path",
        )
        t.add_argument(
            "--amp",
            default="config",
            choices=["config", "on", "off"],
            help="mixed precision: as the config says (fp32 without CUDA), force on, or force off",
        )
        t.add_argument(
            "--mmcv-lite",
            action="store_true",
            default=os.environ.get("ZOO_MMCV_COMPAT", "").lower() in ("1", "true", "yes", "on"),
            help="run on mmcv-lite (no compiled ops: nms / roi_align through torchvision); also ZOO_MMCV_COMPAT=1",
        )
        t.set_defaults(func=_cmd_train, task=task)
