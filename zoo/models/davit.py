"""DaViT (Ding et al., ECCV 2022, arXiv:2204.03645) in zoo's registry, built by timm's implementation.

timm's ``timm.models.davit`` is the reference for this family (it loads the official checkpoints of
``dingmyu/davit`` through its ``checkpoint_filter_fn``, and the Florence-2 vision towers), so zoo does
not rewrite it: every timm DaViT architecture is listed in zoo's registry with timm's own entrypoint,
pretrained cfgs and filter. ``zoo.create_model('davit_tiny', ...)`` therefore builds exactly the model
``timm.create_model('davit_tiny', ...)`` builds, with zoo's weight fetching, cards, info and benchmarks.

Facts about the family (variants, the channel-attention chunk order, the official key mapping) are in
the project's DaViT spec and in ``model_cards/davit_*.md``.
"""

from __future__ import annotations

from collections import deque
from dataclasses import replace

import timm.models.davit as _timm_davit
from timm.models import model_entrypoint
from timm.models._pretrained import DefaultCfg
from timm.models._registry import _model_default_cfgs, list_models

from .._registry import register_external

__all__ = ["DaVit", "checkpoint_filter_fn", "FAMILY", "DAVIT_ARCHS"]

DaVit = _timm_davit.DaVit
checkpoint_filter_fn = _timm_davit.checkpoint_filter_fn

# Card facts: what the family is and where its numbers come from.
FAMILY = dict(
    name="DaViT",
    title="DaViT: Dual Attention Vision Transformers",
    paper_ids="arXiv:2204.03645",
    origin_url="https://github.com/dingmyu/davit",
    implementation="timm (`timm.models.davit`), listed in zoo unchanged",
    citation="""@inproceedings{ding2022davit,
  title={DaViT: Dual Attention Vision Transformers},
  author={Ding, Mingyu and Xiao, Bin and Codella, Noel and Luo, Ping and Wang, Jingdong and Yuan, Lu},
  booktitle={ECCV},
  year={2022}
}""",
    # timm results-imagenet.csv at 224, crop 0.95 bicubic (top-1, top-5)
    reported_top1={"davit_tiny.msft_in1k": 82.694, "davit_small.msft_in1k": 84.252, "davit_base.msft_in1k": 84.652},
    reported_source="timm results-imagenet.csv (224, crop 0.95, bicubic); official README: T 82.8 / S 84.2 / B 84.6",
)


def _with_true_pool_size(default_cfg: DefaultCfg) -> DefaultCfg:
    """timm's Florence-2 cfgs run at 768 px but keep the 224-px ``pool_size`` (7, 7); zoo states 768 / 32."""
    cfgs = {}
    for tag, cfg in default_cfg.cfgs.items():
        pool = tuple(s // 32 for s in cfg.input_size[1:])
        cfgs[tag] = replace(cfg, pool_size=pool) if cfg.pool_size and tuple(cfg.pool_size) != pool else cfg
    return DefaultCfg(tags=deque(default_cfg.tags), cfgs=cfgs, is_pretrained=default_cfg.is_pretrained)


DAVIT_ARCHS = list_models(module="davit")
for _arch in DAVIT_ARCHS:
    register_external(
        _arch,
        model_entrypoint(_arch),
        _with_true_pool_size(_model_default_cfgs[_arch]),
        kind="backbone",
        module=__name__,
    )
