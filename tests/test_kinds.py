"""The small contract of each non-backbone kind, checked for every registered entry of that kind.

Backbones have timm's contract (tests/models/test_conformance.py). The other kinds are built from plain
keyword arguments and checked here; a new head joins these tests by registering with its kind.
"""

from __future__ import annotations

import pytest
import torch

import zoo


def _entries(kind: str) -> list:
    names = zoo.list_models(kind=kind)
    if names:
        return names
    return [pytest.param(None, marks=pytest.mark.skip(reason=f"no {kind} entry is registered yet"), id="none")]


MIL_HEADS = _entries("mil_head")
PROBES = _entries("probe")
SCANPATH = _entries("scanpath")


def test_kinds_are_documented() -> None:
    assert set(zoo.KINDS) == {"backbone", "mil_head", "probe", "scanpath"}
    assert all(zoo.KINDS[k] for k in zoo.KINDS)


@pytest.mark.parametrize("name", MIL_HEADS)
def test_mil_head_contract(name: str) -> None:
    head = zoo.create_model(name, in_dim=32, num_classes=3).eval()
    out = head(torch.randn(17, 32))  # one bag of 17 instances
    assert out["logits"].shape == (1, 3) and "attention" in out
    bags, mask = torch.randn(2, 9, 32), torch.ones(2, 9, dtype=torch.bool)
    mask[1, 5:] = False  # the second bag is padded
    out = head(bags, mask=mask)
    assert out["logits"].shape == (2, 3)


@pytest.mark.parametrize("name", PROBES)
def test_probe_contract(name: str) -> None:
    probe = zoo.create_model(name, embed_dim=32, num_classes=5).eval()
    assert probe(torch.randn(4, 10, 32)).shape == (4, 5)


@pytest.mark.parametrize("name", SCANPATH)
def test_scanpath_contract(name: str) -> None:
    model = zoo.create_model(name)
    assert isinstance(model, torch.nn.Module)
