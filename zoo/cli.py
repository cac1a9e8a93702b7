"""The ``zoo`` command: list, info, card, bench, export, demo, train, validate, wsi, mil, probe, scanpath,
finetune, det, seg.

Each verb is a thin wrapper over a function of the package (``zoo.list_models``, ``zoo.tools.*``), so
everything the command does is also reachable from Python.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from ._cli_errors import ZooArgumentParser, non_negative_int, positive_int, run_reporting_errors, split_debug_flag


def _cmd_list(args: argparse.Namespace) -> int:
    import zoo

    names = zoo.list_models(args.filter or "", pretrained=args.pretrained, kind=args.kind)
    if not names:
        print(f"no model matches {args.filter!r}", file=sys.stderr)
        return 1
    for name in names:
        print(name)
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    from zoo.tools.info import model_info

    info = model_info(args.name, gmacs=not args.no_gmacs)
    if args.json:
        print(json.dumps(info.as_dict(), indent=2, default=str))
        return 0
    print(f"{info.name}  ({info.family or 'timm'}, {info.kind})")
    print(f"  params       {info.params:,} ({info.params / 1e6:.2f} M)")
    if info.gmacs is not None:
        print(f"  GMACs        {info.gmacs:.3f} at {info.input_size[1]}x{info.input_size[2]}")
    for i, level in enumerate(info.feature_info):
        print(f"  feature {i}    {level.get('module')}: {level['num_chs']} channels, stride {level['reduction']}")
    for tag, src in info.tags.items():
        print(f"  weights      {tag}: {src['source']} (licence {src['license'] or 'unknown'})")
    return 0


def _cmd_card(args: argparse.Namespace) -> int:
    import zoo
    from zoo.tools.cards import write_card

    names = zoo.list_models() if args.all else args.names
    if not names:
        print("name one or more models, or pass --all", file=sys.stderr)
        return 2
    for name in names:
        if not zoo.is_zoo_model(name):
            raise ValueError(f"{name!r} is not a zoo architecture (cards are for zoo's registry; see `zoo list`)")
        print(write_card(name, args.out))
    if args.readme:
        from zoo.tools.cards import update_readme

        print(update_readme(args.readme))
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from zoo.tools.bench import benchmark_models, write_csv

    rows = benchmark_models(
        args.names,
        args.vs,
        batch_size=args.batch_size,
        img_size=args.img_size,
        iters=args.iters,
        warmup=args.warmup,
        train=not args.no_train,
        device=args.device,
        dtype=args.dtype,
    )
    peer = rows[0].peer
    print(f"device {rows[0].device}, dtype {args.dtype}, batch {args.batch_size}, {args.img_size}px; ratios to {peer}")
    columns = ("infer img/s", 11), ("ratio", 7), ("train img/s", 11), ("ratio", 7), ("peak MiB", 9), ("mem", 6)
    print(f"{'model':40s} " + " ".join(f"{title:>{width}s}" for title, width in columns))
    for r in rows:
        train = f"{r.train_img_s:11.1f} {r.train_time_ratio:7.3f} {r.train_peak_mib:9.1f} {r.train_mem_ratio:6.3f}"
        print(f"{r.model:40s} {r.infer_img_s:11.1f} {r.infer_time_ratio:7.3f} " + (train if not args.no_train else ""))
    if args.out:
        print(f"wrote {write_csv(rows, args.out)}")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    import zoo
    from zoo.tools.export import export_model

    kind = zoo.model_kind(args.name) if ":" not in args.name else "backbone"
    if kind != "backbone":  # timm's local-dir layout (config.json + weights) is for image backbones
        raise ValueError(
            f"{args.name} is a {kind}: zoo export writes timm's folder layout for image backbones; save the "
            f"head's state_dict with safetensors and rebuild it with zoo.create_model({args.name!r}, "
            "checkpoint_path=...)"
        )
    overlay = dict(file=args.file) if args.file else None
    model = zoo.create_model(
        args.name,
        pretrained=args.pretrained or bool(args.file),
        pretrained_cfg_overlay=overlay,
        checkpoint_path=args.checkpoint,
        num_classes=args.num_classes,
    )
    result = export_model(model, args.out)
    print(result.path)
    print(result.how_to_load())
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from zoo.tools.demo import run_demo

    return run_demo(data=args.data, out=args.out)


def build_parser() -> argparse.ArgumentParser:
    parser = ZooArgumentParser(
        prog="zoo",
        description=" ".join(__doc__.split("\n\n")[0].split()).replace("``", ""),  # every verb, one paragraph
        epilog="Errors print as one line; --debug (anywhere) or ZOO_DEBUG=1 shows the traceback.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("list", help="list zoo architectures (fnmatch filter, e.g. 'davit*')")
    p.add_argument("filter", nargs="?", default="", help="fnmatch pattern")
    p.add_argument("--pretrained", action="store_true", help="only arch.tag names with weights")
    p.add_argument("--kind", default=None, help="backbone, mil_head, probe or scanpath")
    p.set_defaults(func=_cmd_list)

    p = sub.add_parser("info", help="params, GMACs, feature levels and weight sources of a model")
    p.add_argument("name")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--no-gmacs", action="store_true", help="skip the FLOP count (large models)")
    p.set_defaults(func=_cmd_info)

    p = sub.add_parser("card", help="write model_cards/NAME.md")
    p.add_argument("names", nargs="*")
    p.add_argument("--all", action="store_true", help="every architecture in zoo's registry")
    p.add_argument("--out", default="model_cards", help="output folder")
    p.add_argument("--readme", default=None, help="also refresh the models table in this README")
    p.set_defaults(func=_cmd_card)

    p = sub.add_parser("bench", help="throughput and peak memory, interleaved, ratio to the first peer")
    p.add_argument("names", nargs="+")
    p.add_argument("--vs", nargs="*", default=[], help="peer models; ratios are to the first")
    p.add_argument("--batch-size", "-b", type=positive_int, default=8)
    p.add_argument("--img-size", type=positive_int, default=224)
    p.add_argument("--iters", type=positive_int, default=5, help="timed round-robin rounds")
    p.add_argument("--warmup", type=non_negative_int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--no-train", action="store_true", help="inference only")
    p.add_argument("--out", default=None, help="CSV file to append rows to")
    p.set_defaults(func=_cmd_bench)

    p = sub.add_parser(
        "export",
        help="write model.safetensors + config.json for timm's local-dir: (timm alone reads timm architectures; "
        "zoo-only ones need `import zoo`)",
    )
    p.add_argument("name")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--pretrained", action="store_true", help="load the cfg's weights first")
    p.add_argument("--file", default=None, help="a local checkpoint (official or timm format) to load first")
    p.add_argument("--checkpoint", default=None, help="a timm-format checkpoint loaded strictly after the build")
    p.add_argument("--num-classes", type=non_negative_int, default=None)
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser("demo", help="train a BiFormer on embedded Fashion-MNIST (else digits) on the CPU, validate it")
    p.add_argument("--data", default="auto", choices=["auto", "fashion_mnist", "digits"], help="auto: Fashion-MNIST")
    p.add_argument("--out", default="runs/demo", help="run folder")
    p.set_defaults(func=_cmd_demo)

    # entry points of the training package, the whole-slide pipeline and the heads register their own verbs
    from zoo.mm.cli import add_cli as add_mm_cli
    from zoo.train.cli import add_cli as add_train_cli
    from zoo.train.finetune import add_cli as add_finetune_cli
    from zoo.train.mil import add_cli as add_mil_cli
    from zoo.train.probe import add_cli as add_probe_cli
    from zoo.train.scanpath import add_cli as add_scanpath_cli
    from zoo.train.wsi_cli import add_cli as add_wsi_cli

    add_train_cli(sub)  # zoo train, zoo validate
    add_wsi_cli(sub)  # zoo wsi info|extract|heatmap
    add_mil_cli(sub)  # zoo mil train
    add_probe_cli(sub)  # zoo probe
    add_scanpath_cli(sub)  # zoo scanpath train|eval|predict|convert
    add_finetune_cli(sub)  # zoo finetune --task cxr
    add_mm_cli(sub)  # zoo det train, zoo seg train (mmdet / mmsegmentation)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv, debug = split_debug_flag(argv)
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exit_:  # argparse's usage errors (already printed as one line) and --help
        return exit_.code if isinstance(exit_.code, int) else 0
    prog = " ".join(["zoo", *(v for k, v in vars(args).items() if k.endswith("command") and isinstance(v, str))])
    return run_reporting_errors(lambda: args.func(args), prog, debug)


if __name__ == "__main__":
    sys.exit(main())
