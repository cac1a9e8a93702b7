"""``--model.attn_backend`` reaches the model's attention layers (zoo.ops backend); unset, models keep auto and
models without zoo.ops attention are built as before. Builds models only: no training run."""

import argparse

import pytest

from zoo.train.config import add_config_arguments, config_from_args
from zoo.train.loop import build_model

from ._common import TINY_BIFORMER


def parse(*argv: str):
    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    return config_from_args(parser.parse_args(list(argv)))


def _attention_backends(model) -> list:
    return [m.attn_backend for m in model.modules() if type(m).__name__ in ("BiLevelRoutingAttention", "ZooHaloAttn")]


@pytest.mark.parametrize(
    "flags", [("--model", "biformer_tiny", "--model.kwargs", TINY_BIFORMER), ("--model", "halonet26t")]
)
def test_attn_backend_reaches_the_attention_layers(flags):
    cfg = parse(*flags, "--model.attn_backend", "torch")
    assert cfg.model.attn_backend == "torch"
    backends = _attention_backends(build_model(cfg, num_classes=10, in_chans=3))
    assert backends and set(backends) == {"torch"}
    backends = _attention_backends(build_model(parse(*flags), num_classes=10, in_chans=3))
    assert backends and set(backends) == {None}  # unset: the dispatch decides


def test_unset_attn_backend_is_not_passed_to_other_models():
    cfg = parse("--model", "resnet18")
    assert cfg.model.attn_backend == ""
    assert build_model(cfg, num_classes=10, in_chans=3).num_classes == 10  # timm's resnet takes no attn_backend
