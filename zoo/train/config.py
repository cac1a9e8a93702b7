"""The training configuration: a typed dataclass tree, filled from defaults < YAML recipe < command line.

Every option is a dataclass field with a default and a one-line ``help`` (``metadata``); the command line
is generated from the tree as ``--section.option`` (``--optim.lr 1e-3``; dashes and underscores both work),
plus short aliases for the everyday ones (``--model``, ``--data``, ``--epochs``, ``--batch-size``, ``--lr``,
``--out``, ``--resume``). ``--config recipe.yaml`` (or a recipe name under ``zoo/train/recipes/``) overlays a
YAML mapping of the same sections first; flags given explicitly win.

Values are type-checked when the config is built (``ConfigTypeError`` names the option, the value and the
expected type): an int option takes an int (or an integral number / numeric string), a float option a number
(YAML reads ``1e-3`` as a string: numeric strings are accepted), a str option a string, a bool option a bool,
``list[float]`` / ``list[str]`` options lists of those (a comma-separated string too), dict options mappings.
Options with ``min=`` / ``max=`` in their metadata are range-checked.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

RECIPES_DIR = Path(__file__).parent / "recipes"


class ConfigTypeError(ValueError):
    """A recipe or flag value of the wrong type or out of range; the message names the option."""


def option(default: Any, help: str, **kw: Any) -> Any:  # noqa: A002 - mirrors argparse's name
    """A dataclass field with a default and its one-line help (``min=`` / ``max=``: allowed range)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=dict(help=help, **kw))
    return field(default=default, metadata=dict(help=help, **kw))


@dataclass
class ModelConfig:
    name: str = option("biformer_tiny", "registry name (zoo's, then timm's), e.g. biformer_tiny, davit_tiny")
    kwargs: dict = option({}, "extra create_model kwargs as a YAML/JSON mapping, e.g. '{n_win: 4, depths: [1,1,2,1]}'")
    pretrained: bool = option(False, "load the registry's pretrained weights (must be available offline)")
    checkpoint_path: str = option("", "timm-format weights loaded after the build (fine-tuning)")
    drop_rate: float = option(0.0, "dropout before the classifier", min=0.0, max=1.0)
    drop_path_rate: float = option(0.1, "stochastic depth rate (linear over blocks)", min=0.0, max=1.0)
    attn_backend: str = option(
        "", "zoo.ops backend of the model's attention (create_model(attn_backend=)), e.g. torch; '' = auto"
    )
    grad_checkpointing: bool = option(False, "activation checkpointing (model.set_grad_checkpointing)")
    channels_last: bool = option(False, "channels-last memory format for model and inputs")
    compile: bool = option(False, "torch.compile the model")
    sync_bn: bool = option(False, "convert BatchNorm to SyncBatchNorm under DDP")


@dataclass
class DataConfig:
    source: str = option("digits", "fashion_mnist | digits (embedded), a folder with train/ and val/, or 'wds'")
    train_split: str = option("train", "sub-folder of the training images")
    val_split: str = option("val", "sub-folder of the validation images")
    img_size: int = option(0, "train/eval input size; 0 = the model's pretrained_cfg input size", min=0)
    in_chans: int = option(0, "input channels; 0 = 1 for the gray embedded sets, else 3", min=0)
    num_workers: int = option(2, "DataLoader worker processes per rank", min=0)
    limit_train: int = option(0, "use only the first N training samples (0 = all)", min=0)
    limit_val: int = option(0, "use only the first N validation samples (0 = all)", min=0)
    corrupt: str = option("skip", "an unreadable image: 'skip' (reported by path, counted) or 'raise' (fail fast)")
    wds_train: str = option("", "WebDataset training shards (brace pattern), with --data wds")
    wds_val: str = option("", "WebDataset validation shards, with --data wds")
    wds_train_samples: int = option(0, "samples per training epoch of the WebDataset stream", min=0)
    wds_num_classes: int = option(0, "classes of a WebDataset source", min=0)


@dataclass
class AugConfig:
    no_aug: bool = option(False, "no training augmentation at all (resize + normalise only)")
    scale: list[float] = option([0.08, 1.0], "RandomResizedCrop scale range")
    hflip: float = option(0.5, "horizontal flip probability", min=0.0, max=1.0)
    auto_augment: str = option("", "timm auto-augment policy, e.g. rand-m9-mstd0.5-inc1 ('' = none)")
    color_jitter: float = option(0.4, "colour jitter strength (ignored with auto_augment)", min=0.0)
    reprob: float = option(0.0, "random erasing probability", min=0.0, max=1.0)
    remode: str = option("pixel", "random erasing mode")
    interpolation: str = option("", "resize interpolation; '' = the model's pretrained_cfg")
    crop_pct: float = option(0.0, "eval centre-crop fraction; 0 = the model's pretrained_cfg", min=0.0, max=1.0)
    mixup: float = option(0.0, "mixup alpha (0 = off)", min=0.0)
    cutmix: float = option(0.0, "cutmix alpha (0 = off)", min=0.0)
    mixup_prob: float = option(1.0, "probability of applying mixup or cutmix to a batch", min=0.0, max=1.0)
    mixup_switch_prob: float = option(0.5, "probability of cutmix instead of mixup when both are on", min=0.0, max=1.0)
    label_smoothing: float = option(
        0.1, "label smoothing (in mixup's targets, or in the loss without mixup)", min=0.0, max=1.0
    )
    repeated_aug: int = option(0, "repeated augmentation: repeats per sample (0 = off; DeiT uses 3)", min=0)


@dataclass
class LossConfig:
    """The training loss, picked as timm's train.py picks it (validation always uses plain cross-entropy).

    mixup/cutmix on: soft-target CE, or BCE with ``bce`` (smoothing is already in mixup's targets);
    else label smoothing > 0: label-smoothing CE, or BCE with smoothing; else plain CE, or BCE with ``bce``.
    """

    bce: bool = option(False, "binary cross-entropy, one sigmoid per class (timm BinaryCrossEntropy, --bce-loss)")
    bce_target_thresh: float = option(0.0, "BCE: binarize targets above this value, e.g. 0.2 (0 = keep soft targets)")
    bce_sum: bool = option(False, "BCE: sum over classes before the batch mean (timm --bce-sum)")
    bce_pos_weight: float = option(0.0, "BCE: weight of the positive targets (0 = unweighted; timm --bce-pos-weight)")


@dataclass
class OptimConfig:
    opt: str = option("adamw", "timm optimizer name: adamw, lamb, sgd, ...")
    lr: float = option(1e-3, "peak learning rate (at lr_base_size when that is set)", min=0.0)
    lr_base_size: int = option(0, "scale lr linearly by global_batch / lr_base_size (0 = use lr as given)", min=0)
    weight_decay: float = option(0.05, "weight decay (not applied to norms and biases)", min=0.0)
    momentum: float = option(0.9, "SGD momentum")
    eps: float = option(1e-8, "optimizer epsilon", min=0.0)
    layer_decay: float = option(0.0, "layer-wise lr decay via the model's group_matcher (0 = off)", min=0.0)
    clip_grad: float = option(0.0, "gradient clipping threshold (0 = off)", min=0.0)
    clip_mode: str = option("norm", "clipping mode: norm, value, agc")


@dataclass
class ScheduleConfig:
    sched: str = option("cosine", "timm scheduler: cosine, step, plateau, ... (stepped per update)")
    epochs: int = option(10, "training epochs", min=1)
    warmup_epochs: int = option(1, "linear warm-up epochs", min=0)
    warmup_lr: float = option(1e-6, "learning rate at the start of warm-up", min=0.0)
    min_lr: float = option(1e-5, "final learning rate of the cosine", min=0.0)


@dataclass
class LoopConfig:
    batch_size: int = option(128, "GLOBAL batch per optimizer step (split over ranks and accumulation steps)", min=1)
    grad_accum: int = option(1, "gradient accumulation micro-steps per optimizer step", min=1)
    amp: str = option("none", "autocast dtype: none, bf16, fp16 (fp16 uses a GradScaler)")
    ema: bool = option(False, "keep an EMA of the weights (timm ModelEmaV3)")
    ema_decay: float = option(0.9998, "EMA decay", min=0.0, max=1.0)
    eval_ema: bool = option(False, "evaluate the EMA weights instead of the raw ones")
    seed: int = option(0, "seed; rank r seeds with seed + r, augmentation is seeded per sample")
    max_steps: int = option(0, "stop after this many optimizer steps (0 = run all epochs)", min=0)
    time_limit: float = option(0.0, "stop cleanly after this many seconds of training and evaluate (0 = none)", min=0.0)
    eval_every: int = option(1, "evaluate every N epochs (and always at the end)", min=1)
    device: str = option("", "cpu, cuda; '' = cuda when available")
    nan_check: bool = option(True, "stop with an error naming the step when the loss is not finite")
    threads: int = option(0, "intra-op CPU threads per rank (0 = torch's default; 1 is fastest on a busy CPU)", min=0)
    deterministic: bool = option(False, "torch.use_deterministic_algorithms (bitwise reruns on GPU)")


@dataclass
class CheckpointConfig:
    dir: str = option("", "checkpoint folder; '' = OUT/checkpoints")
    every_steps: int = option(0, "also checkpoint every N optimizer steps (0 = at epoch ends only)", min=0)
    keep_last: int = option(3, "step checkpoints kept besides the best (0 = all)", min=0)
    resume: str = option("", "'auto' = newest valid checkpoint in the folder, or a checkpoint file")
    overwrite: bool = option(
        False, "start over in a run folder that holds another run: its checkpoints and logs are deleted"
    )


@dataclass
class LogConfig:
    out: str = option("runs/train", "run folder: metrics.csv, curves.png, config.yaml, checkpoints/")
    backends: list[str] = option(["csv"], "any of csv, tensorboard, wandb (wandb offline unless configured)")
    run_name: str = option("", "run name for TensorBoard / wandb")
    every: int = option(20, "steps between plain progress lines when stdout is not a TTY", min=1)
    plot: bool = option(True, "write curves.png at the end")
    step_every: int = option(10, "write step, loss, lr to steps.csv every N optimizer steps (0 = off)", min=0)


@dataclass
class DistConfig:
    strategy: str = option("ddp", "ddp or fsdp (FSDP2 fully_shard per block) when launched by torchrun")
    backend: str = option("", "process group backend; '' = nccl on CUDA, gloo on CPU")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    aug: AugConfig = field(default_factory=AugConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    loop: LoopConfig = field(default_factory=LoopConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)
    dist: DistConfig = field(default_factory=DistConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


SECTIONS = {f.name: f.type for f in dataclasses.fields(Config)}
# everyday flags: alias -> (section, option)
ALIASES = {
    "model": ("model", "name"),
    "data": ("data", "source"),
    "epochs": ("schedule", "epochs"),
    "batch-size": ("loop", "batch_size"),
    "lr": ("optim", "lr"),
    "out": ("log", "out"),
    "resume": ("checkpoint", "resume"),
    "seed": ("loop", "seed"),
    "log": ("log", "backends"),
    "overwrite": ("checkpoint", "overwrite"),
}


def _section_class(section: str) -> type:
    return {f.name: f.default_factory for f in dataclasses.fields(Config)}[section]  # type: ignore[return-value]


def _type_name(kind: Any) -> str:
    return getattr(kind, "__name__", None) if typing.get_origin(kind) is None else str(kind)


def _number(kind: type, value: Any) -> Any:
    """``value`` as an int / float, from a number or a numeric string; ``None`` when it is neither."""
    if isinstance(value, bool):
        return None
    if isinstance(value, str):
        try:
            value = float(value) if kind is float or not value.strip().lstrip("+-").isdigit() else int(value)
        except ValueError:
            return None
    if isinstance(value, (int, float)):
        if kind is int:
            return int(value) if float(value).is_integer() else None
        return float(value)
    return None


def coerce_value(kind: Any, value: Any, name: str, meta: dict[str, Any] | None = None) -> Any:
    """``value`` checked (and where unambiguous converted) to the option type ``kind``; range-checked.

    Raises:
        ConfigTypeError: naming ``name``, the value and the expected type or range.
    """
    meta = meta or {}
    origin, args = typing.get_origin(kind), typing.get_args(kind)

    def fail(expected: str) -> ConfigTypeError:
        return ConfigTypeError(f"{name} must be {expected}, got {value!r} ({type(value).__name__})")

    if kind is bool:
        if isinstance(value, bool):
            out = value
        elif isinstance(value, str) and value.strip().lower() in _BOOL_WORDS:
            out = _BOOL_WORDS[value.strip().lower()]
        else:
            raise fail("true or false")
    elif kind in (int, float):
        out = _number(kind, value)
        if out is None or (isinstance(out, float) and not math.isfinite(out)):
            raise fail("an integer" if kind is int else "a finite number")
    elif kind is str:
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise fail("a string")
        out = str(value)
    elif kind is list or origin is list:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise fail("a list")
        element = args[0] if args else None
        out = [coerce_value(element, v, f"{name}[{i}]") if element else v for i, v in enumerate(value)]
    elif kind is dict or origin is dict:
        if not isinstance(value, dict):
            raise fail("a mapping, e.g. {key: value}")
        out = dict(value)
    else:  # pragma: no cover - every option has one of the types above
        out = value
    low, high = meta.get("min"), meta.get("max")
    if low is not None and out < low:
        raise ConfigTypeError(f"{name} must be >= {low}, got {value!r}")
    if high is not None and out > high:
        raise ConfigTypeError(f"{name} must be <= {high}, got {value!r}")
    return out


_BOOL_WORDS = {"1": True, "true": True, "yes": True, "on": True, "0": False, "false": False, "no": False, "off": False}


def _parse_value(kind: Any, text: str) -> Any:
    """A command-line string as a value of option type ``kind`` (YAML for mappings and lists)."""
    if kind is dict or typing.get_origin(kind) is dict or kind is list or typing.get_origin(kind) is list:
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError as err:
            raise argparse.ArgumentTypeError(f"{text!r} is not valid YAML ({str(err).splitlines()[0]})") from None
        if value is None:
            value = [] if (kind is list or typing.get_origin(kind) is list) else value
        if isinstance(value, (str, int, float)) and (kind is list or typing.get_origin(kind) is list):
            value = str(value)  # 'csv,tensorboard'
    else:
        value = text
    try:
        return coerce_value(kind, value, "value")
    except ConfigTypeError as err:
        raise argparse.ArgumentTypeError(str(err).replace("value must be", "expected", 1)) from None


def _converter(kind: Any):
    """argparse ``type=``: named after the option type, so argparse's messages name it too."""
    convert = lambda text: _parse_value(kind, text)  # noqa: E731
    convert.__name__ = _type_name(kind)
    return convert


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``--config`` and one ``--section.option`` flag per config field (plus aliases) to ``parser``."""
    parser.add_argument("--config", default=None, help="YAML recipe (path, or a name in zoo/train/recipes/)")
    hints = {name: typing.get_type_hints(_section_class(name)) for name in SECTIONS}
    alias_of = {v: k for k, v in ALIASES.items()}
    for section in SECTIONS:
        group = parser.add_argument_group(section)
        for f in dataclasses.fields(_section_class(section)):
            kind = hints[section][f.name]
            names = [f"--{section}.{f.name}"]
            if "_" in f.name:
                names.append(f"--{section}.{f.name.replace('_', '-')}")
            if (section, f.name) in alias_of:
                names.insert(0, f"--{alias_of[(section, f.name)]}")
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            group.add_argument(
                *names,
                dest=f"{section}.{f.name}",
                type=_converter(kind),
                default=argparse.SUPPRESS,  # only flags given explicitly override the recipe
                metavar=(_type_name(typing.get_origin(kind) or kind) or "value").upper(),
                help=f"{f.metadata['help']} (default: {default!r})",
            )


def load_recipe(name_or_path: str) -> dict[str, Any]:
    """A YAML recipe as a nested dict; a bare name is looked up in ``zoo/train/recipes/``.

    Raises:
        FileNotFoundError: no such file or recipe name.
        ConfigTypeError: the file is not valid YAML, is empty, or is not a mapping of sections.
    """
    path = Path(name_or_path)
    if not path.is_file():
        if path.is_dir():
            raise FileNotFoundError(f"recipe {name_or_path} is a folder; pass a .yaml file")
        candidate = RECIPES_DIR / (name_or_path if name_or_path.endswith(".yaml") else f"{name_or_path}.yaml")
        if not candidate.is_file():
            known = sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))
            raise FileNotFoundError(f"recipe {name_or_path!r} not found (no such file; recipes: {known})")
        path = candidate
    try:
        data = yaml.safe_load(path.read_text())
    except UnicodeDecodeError:
        raise ConfigTypeError(f"recipe {path} is not a text (YAML) file") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigTypeError(f"recipe {path} is not valid YAML{where}: {problem}") from None
    if data is None:
        raise ConfigTypeError(f"recipe {path} is empty; it needs sections such as 'optim: {{lr: 0.001}}'")
    if not isinstance(data, dict):
        raise ConfigTypeError(f"recipe {path} must be a YAML mapping of sections, got {type(data).__name__}")
    return data


def apply_overrides(cfg: Config, overrides: dict[str, Any], origin: str = "recipe") -> Config:
    """Overlay a nested ``{section: {option: value}}`` mapping on ``cfg`` (in place).

    Unknown sections and options are errors (with close names); values are type- and range-checked.
    """
    for section, values in overrides.items():
        if section not in SECTIONS:
            close = difflib.get_close_matches(str(section), SECTIONS, n=3)
            raise ConfigTypeError(f"{origin}: unknown section {section!r}; sections: {list(SECTIONS)} (close: {close})")
        target = getattr(cfg, section)
        if values is None:
            continue  # 'optim:' with nothing under it
        if not isinstance(values, dict):
            raise ConfigTypeError(f"{origin}: section {section!r} must be a mapping, got {values!r}")
        fields = {f.name: f for f in dataclasses.fields(target)}
        hints = typing.get_type_hints(type(target))
        for key, value in values.items():
            key = str(key).replace("-", "_")
            if key not in fields:
                close = difflib.get_close_matches(key, fields, n=3)
                raise ConfigTypeError(f"{origin}: unknown option {section}.{key}; did you mean {close}?")
            try:
                value = coerce_value(hints[key], value, f"{section}.{key}", dict(fields[key].metadata))
            except ConfigTypeError as err:
                raise ConfigTypeError(f"{origin}: {err}") from None
            setattr(target, key, value)
    return cfg


def config_from_args(args: argparse.Namespace) -> Config:
    """Defaults, then the ``--config`` recipe, then the explicit flags."""
    cfg = Config()
    if getattr(args, "config", None):
        apply_overrides(cfg, load_recipe(args.config), origin=f"recipe {args.config}")
    flags: dict[str, dict[str, Any]] = {}
    for key, value in vars(args).items():
        if "." in key:
            section, name = key.split(".", 1)
            flags.setdefault(section, {})[name] = value
    return apply_overrides(cfg, flags, origin="command line")


def dump_config(cfg: Config) -> str:
    """The resolved config as YAML (written next to the run's metrics)."""
    return yaml.safe_dump(json.loads(json.dumps(cfg.to_dict())), sort_keys=False)


def config_from_dict(data: dict[str, Any]) -> Config:
    """Rebuild a ``Config`` from ``Config.to_dict()`` output (as stored in checkpoints)."""
    return apply_overrides(Config(), data, origin="stored config")
