"""Model cards (``model_cards/NAME.md``), generated from the registry and measured numbers.

A card is built from: the family's ``FAMILY`` facts (title, paper, origin, citation, reported accuracy; per
architecture ``references`` = the authors' code it reproduces, and ``deviations`` = {keyword: why}),
the architecture's pretrained cfgs (input size, crop, weights and licence), numbers measured here
(parameters, GMACs with ``FlopCounterMode``, feature levels) and accuracy rows a validation run wrote
in timm's ``results-imagenet.csv`` schema under ``benchmarks/results/``.
"""

from __future__ import annotations

import csv
from pathlib import Path

from .. import _registry
from .info import ModelInfo, family_of, model_info

__all__ = ["render_card", "write_card", "measured_accuracy", "models_table", "update_readme", "RESULTS_DIR"]

README_START, README_END = "<!-- models:start -->", "<!-- models:end -->"

RESULTS_DIR = Path(__file__).resolve().parents[2] / "benchmarks" / "results"


def measured_accuracy(name: str, results_dir: Path = RESULTS_DIR) -> list[dict[str, str]]:
    """Rows for ``name`` (any tag) from ``results-*.csv`` files in timm's results schema."""
    rows = []
    for path in sorted(results_dir.glob("results-*.csv")):
        with path.open() as f:
            for row in csv.DictReader(f):
                if _registry.split_model_name_tag(row.get("model", ""))[0] == name:
                    rows.append({**row, "file": path.name})
    return rows


def _usage(name: str, info: ModelInfo) -> str:
    if info.kind != "backbone":
        example = {
            "mil_head": f'head = zoo.create_model("{name}", in_dim=512, num_classes=2)\n'
            "out = head(torch.randn(1000, 512))  # one bag of 1000 instance features -> out['logits'] (1, 2)",
            "probe": f'probe = zoo.create_model("{name}", embed_dim=768, num_classes=1000)\n'
            "logits = probe(torch.randn(8, 196, 768))  # frozen backbone tokens (B, N, D) -> (8, 1000)",
        }.get(info.kind, f'model = zoo.create_model("{name}")  # inputs: see the module docstring')
        return f"""```python
import torch
import zoo

{example}
```"""
    return f"""```python
import torch
import zoo

# classification
model = zoo.create_model("{name}", pretrained=False, num_classes=10).eval()
logits = model(torch.randn(1, *model.pretrained_cfg["input_size"]))

# feature maps (NCHW, one per level)
backbone = zoo.create_model("{name}", features_only=True, out_indices=(1, 2, 3))
print(backbone.feature_info.channels(), backbone.feature_info.reduction())

# timm's own tools take it after `import zoo`
import timm
cfg = timm.data.resolve_data_config(model=model)

# official-format checkpoint on disk (goes through the family's checkpoint_filter_fn)
# model = zoo.create_model("{name}", pretrained=True, pretrained_cfg_overlay=dict(file="/path/to/ckpt.pth"))
```

Detection and segmentation frameworks take the `features_only` backbone (see the project README)."""


def detection_segmentation_configs(name: str) -> list[tuple[str, str]]:
    """(config path, its "Reported" comment) for zoo's mmdet/mmseg configs whose backbone is ``name``."""
    root = Path(__file__).resolve().parents[1]
    found = []
    for folder in ("detection/configs", "segmentation/configs"):
        for path in sorted((root / folder).glob("[!_]*.py")):
            text = path.read_text()
            if f'model_name="{name}"' not in text:
                continue
            lines = text.splitlines()
            start = next((i for i, ln in enumerate(lines) if ln.startswith("# Reported")), None)
            reported = ""
            if start is not None:  # the "# Reported" comment and its continuation lines, up to the next heading
                chunk = [lines[start][2:]]
                for ln in lines[start + 1 :]:
                    if not ln.startswith("# ") or ln[2:3].isupper() or ln.startswith("#   "):
                        break
                    chunk.append(ln[2:])
                reported = " ".join(part.strip() for part in chunk)
            reported = reported.split(":", 1)[1].strip() if ":" in reported else reported
            found.append((f"zoo/{folder}/{path.name}", reported))
    return found


def render_card(name: str, info: ModelInfo | None = None) -> str:
    """The Markdown card of a zoo architecture."""
    info = info or model_info(name)
    family = family_of(name)
    cfg = _registry.get_pretrained_cfg(name)
    variants = _registry.list_models(module=_registry.get_entry(name).module.split(".")[-1])
    lines = [f"# {name}", ""]
    title = family.get("title", family.get("name", name))
    lines += [
        f"**{title}** ({family.get('paper_ids', 'no paper id')}). Kind: `{info.kind}`. "
        f"Implementation: {family.get('implementation', 'zoo')}.",
        "",
    ]
    if family.get("notes"):
        lines += [family["notes"], ""]
    reference = family.get("references", {}).get(name)
    if reference:  # which authors' code this variant reproduces, at which commit, to what tolerance
        lines += ["## Reference implementation", "", reference, ""]
    deviations = family.get("deviations", {}).get(name)
    if deviations:  # each kept deviation from the reference is a named keyword
        lines += ["## Deviations from the reference (keywords)", ""]
        lines += [f"- `{keyword}`: {why}" for keyword, why in deviations.items()] + [""]
    lines += ["## Variants in this family", "", ", ".join(f"`{v}`" for v in variants), ""]
    lines += ["## Numbers (measured here)", "", "| | |", "|---|---|"]
    lines.append(f"| parameters | {info.params:,} ({info.params / 1e6:.2f} M) |")
    if info.gmacs is not None:
        lines.append(f"| GMACs at {info.input_size[1]}x{info.input_size[2]} | {info.gmacs:.2f} |")
    if cfg is not None and info.kind == "backbone":
        lines.append(f"| input size | {tuple(cfg.input_size)} (min {cfg.min_input_size or 'any'}) |")
        lines.append(f"| eval crop / interpolation | {cfg.crop_pct} / {cfg.interpolation} |")
        lines.append(f"| mean / std | {tuple(cfg.mean)} / {tuple(cfg.std)} |")
    lines.append("")
    if info.feature_info:
        lines += ["## Feature levels (`features_only=True`)", "", "| index | module | channels | stride |"]
        lines.append("|---|---|---|---|")
        for i, level in enumerate(info.feature_info):
            lines.append(f"| {i} | `{level.get('module')}` | {level['num_chs']} | {level['reduction']} |")
        lines.append("")
    lines += ["## Weights and licence", "", "| tag | source | licence |", "|---|---|---|"]
    for tag_name, src in info.tags.items():
        lines.append(f"| `{tag_name}` | {src['source']} | {src['license'] or 'unknown'} |")
    if not info.tags:
        lines.append("| (none) | architecture only | |")
    lines.append("")
    lines += ["## Accuracy", ""]
    reported = {k: v for k, v in family.get("reported_top1", {}).items() if k.split(".")[0] == name}
    if reported:
        lines.append(f"Reported ImageNet-1k top-1 ({family.get('reported_source', 'paper')}):")
        lines.append("")
        for tag_name, top1 in reported.items():
            lines.append(f"- `{tag_name}`: {top1}")
    else:
        lines.append("Reported: none for this variant.")
    lines.append("")
    measured = measured_accuracy(name)
    if measured:
        lines += ["Measured here (`zoo validate`):", "", "| model | img size | top-1 | top-5 | file |"]
        lines.append("|---|---|---|---|---|")
        for row in measured:
            lines.append(
                f"| {row['model']} | {row.get('img_size')} | {row.get('top1')} | {row.get('top5')} | {row['file']} |"
            )
    else:
        lines.append("Measured here: not yet (weights are not downloadable on the project's CI machines).")
    det_seg = detection_segmentation_configs(name)
    if det_seg:
        lines += ["", "## Detection and segmentation (mmdet / mmsegmentation configs)", ""]
        lines += ["| config | reported |", "|---|---|"]
        lines += [f"| `{path}` | {reported} |" for path, reported in det_seg]
        lines.append("")
        lines.append(
            "Train with `zoo det train <config>` / `zoo seg train <config>` (extra `[mm-lite]`, or `[mm]` with a "
            "compiled mmcv)."
        )
    lines += ["", "## Usage", "", _usage(name, info), ""]
    if family.get("citation"):
        lines += ["## Citation", "", "```bibtex", family["citation"].strip(), "```", ""]
    lines += ["---", "Generated by `zoo card` from the registry; do not edit by hand.", ""]
    return "\n".join(lines)


def write_card(name: str, out_dir: Path | str = "model_cards") -> Path:
    """Render and write ``out_dir/NAME.md`` (atomically: a reader never sees half a card)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.md"
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text(render_card(name))
    tmp.replace(path)
    return path


def models_table(names: list[str] | None = None) -> str:
    """The README's Markdown table of zoo architectures: family, params, GMACs, reported top-1, weights."""
    names = names if names is not None else _registry.list_models()
    lines = [
        "| family | model | kind | params (M) | GMACs @ input | reported top-1 | weights |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in names:
        info = model_info(name)
        family = family_of(name)
        top1 = [f"{v}" for k, v in family.get("reported_top1", {}).items() if k.split(".")[0] == name]
        macs = f"{info.gmacs:.2f} @ {info.input_size[1]}" if info.gmacs is not None else "-"
        tags = [t.split(".", 1)[-1] for t, src in info.tags.items() if src["has_weights"]]
        lines.append(
            f"| {family.get('name', '')} | [`{name}`](model_cards/{name}.md) | {info.kind} | "
            f"{info.params / 1e6:.2f} | {macs} | {', '.join(top1) or '-'} | {', '.join(tags) or 'none'} |"
        )
    return "\n".join(lines)


def update_readme(path: Path | str = "README.md") -> Path:
    """Replace the table between the README's model markers with a fresh :func:`models_table`."""
    path = Path(path)
    text = path.read_text()
    if README_START not in text or README_END not in text:
        raise ValueError(f"{path} has no {README_START} ... {README_END} markers to fill")
    head, rest = text.split(README_START, 1)
    _, tail = rest.split(README_END, 1)
    path.write_text(f"{head}{README_START}\n{models_table()}\n{README_END}{tail}")
    return path
