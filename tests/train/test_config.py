"""Config tree: every option has help, recipes overlay, flags win, unknown keys are errors."""

import argparse
import dataclasses

import pytest

from zoo.train.config import RECIPES_DIR, Config, add_config_arguments, config_from_args, load_recipe


def parse(*argv):
    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    return config_from_args(parser.parse_args(list(argv)))


def test_every_option_has_help_and_default():
    for section in dataclasses.fields(Config):
        for f in dataclasses.fields(section.default_factory()):
            assert f.metadata.get("help"), f"{section.name}.{f.name} has no help"


def test_recipe_then_flags(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "optim: {lr: 0.002, weight-decay: 0.01}\nmodel: {name: davit_tiny, kwargs: {drop_path_rate: 0.2}}\n"
    )
    cfg = parse("--config", str(recipe), "--lr", "0.1", "--model.kwargs", "{n_win: 4}", "--loop.amp", "bf16")
    assert cfg.optim.lr == 0.1 and cfg.optim.weight_decay == 0.01 and cfg.model.name == "davit_tiny"
    assert cfg.model.kwargs == {"n_win": 4} and cfg.loop.amp == "bf16"
    assert parse("--log", "csv,tensorboard").log.backends == ["csv", "tensorboard"]
    assert parse("--loop.ema", "true").loop.ema is True


def test_unknown_recipe_key(tmp_path):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("optim: {learning_rate: 0.1}\n")
    with pytest.raises(ValueError, match="unknown option optim.learning_rate"):
        parse("--config", str(recipe))


@pytest.mark.parametrize("path", sorted(RECIPES_DIR.glob("*.yaml")), ids=lambda p: p.stem)
def test_shipped_recipes_load(path):
    cfg = parse("--config", path.stem)
    assert cfg.model.name and cfg.schedule.epochs > 0
    assert load_recipe(path.stem)
