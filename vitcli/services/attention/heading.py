"""The words of a sheet's header: the predicted label and every explained target (merged
targets named together), the file and which maps ignore --target, the model and what it
knows, and one short phrase per option that shapes the picture (the colour scale included).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from .names import readable
from .options import AttentionOptions, Scale, Style

if TYPE_CHECKING:
    from .batches import ImageAttention


def header_texts(result: ImageAttention) -> tuple[list[str], list[str]]:
    """The parts of the sheet's two title lines (each wraps onto more lines where it must):
    the predicted label by name and its score, every target a class-specific map explains
    (targets that name one class for this image share one map: "top1 = class3 = star"),
    then the file and which maps are the same for every class."""
    _, label, score = result.top[0]
    heading = [f"{readable(label)}  {score:.1%}"]
    aliases: dict[str, list[str]] = {}
    for dropped, kept in result.merged_targets.items():
        aliases.setdefault(kept, []).append(dropped)
    for number, (key, (_, name, p)) in enumerate(result.targets.items()):
        names = " = ".join([key, *aliases.get(key, [])])
        explained = f"{names} = {readable(name)} {p:.1%}"
        heading.append(("explained:  " if number == 0 else "") + explained)
    agnostic = [key for key, (_, target) in result.map_info.items() if target is None]
    agnostic += ["attention (raw)"] if result.heads is not None else []
    subheading = [readable(Path(result.path).name), "predicted label (top-1)"]
    if agnostic:
        subheading.append(
            " and ".join(agnostic)
            + ": the same for every class"
            + (", --target does not apply" if result.targets else "")
        )
    return heading, subheading


def title_lines(result: ImageAttention) -> tuple[str, str]:
    """The sheet's two title lines as single strings (`header_texts` joined)."""
    heading, subheading = header_texts(result)
    return "   ·   ".join(heading), "  ·  ".join(subheading)


def model_phrase(reference: str, labels: tuple[str, ...]) -> str:
    """ "model vit-shapes-p16 (knows 6 classes: circle, ...)": a model with few classes says
    them all, so a photo labelled "ring" by a shapes model is read for what it is."""
    phrase = f"model {readable(reference)}"
    if 0 < len(labels) <= 12:
        phrase += f" (knows {len(labels)} classes: {', '.join(map(readable, labels))})"
    elif labels:
        phrase += f" ({len(labels)} classes)"
    return phrase


def header_parts(result: ImageAttention, options: AttentionOptions) -> tuple[str, ...]:
    """The options that shape what the sheet shows, one short phrase each."""
    parts = []
    if "rollout" in result.methods:
        parts.append(
            f"rollout: {options.head_fusion.value} over heads, discard {options.discard_ratio:g}"
        )
    if options.style == Style.heatmap:
        parts.append(f"heatmap {options.colormap.value}")
    else:
        parts.append(f"mask: unattended parts dimmed to {1 - options.overlay_alpha:.0%}")
    if options.scale == Scale.per_map:
        scale = "per-map scale: each tile from 0 to its own peak (compare tiles by their peak)"
    else:
        scale = "shared scale: 0 to the largest value of all heads together, and of each method"
    parts.append(f"{options.interpolation.value}, {scale}")
    parts.append(f"grid {result.grid_size[0]}x{result.grid_size[1]}")
    if result.query == "probe":
        parts.append("class map: the MAP probe's attention (probe tiles, seeds rollout)")
    if result.head_query != "cls" and result.heads is not None:
        parts.append("no CLS token: layer maps are the mean over queries")
    elif result.query != "cls" and result.query != "probe":
        parts.append("no CLS token: mean over queries")
    if "dist" in result.queries:
        parts.append("CLS and dist query rows")
    if result.heads is not None and result.prefix_mass is not None and len(result.prefix_names):
        parts.append(
            "head maps renormalised over the patches; 2nd note line: raw mass on the prefix "
            "tokens (" + ", ".join(_prefix_groups(result.prefix_names)) + ")"
        )
    if options.threshold is not None:
        parts.append(f"outline: top patches with {options.threshold:g} of each head's mass")
    return tuple(parts)


def _prefix_groups(names: Sequence[str]) -> list[str]:
    groups = ["registers" if name.startswith("reg_") else name for name in names]
    return list(dict.fromkeys(groups))
