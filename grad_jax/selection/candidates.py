"""What recipe selection compares: recipes (`Candidate`: backbone, input size, backbone stages,
read from `config.select` / `selection.candidates` as `BACKBONE@SIZE[xWIDTH][:STAGES]`, with the
relative training cost of its head), each scored as every model kind of `selection.kinds`
(`competing_kinds`): the candidates are (recipe, kind) pairs.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence

import ml_collections

from grad_jax.errors import SelectionError
from grad_jax.models.efficientnet import VARIANTS, efficientnet_spec
from grad_jax.models.knn import KINDS

#: The figures a (recipe, kind) pair gets on the synthetic validation.
FIGURE_KEYS = ("image_auroc", "pixel_auroc", "pixel_aupro", "figure")

_CANDIDATE = re.compile(r"^(?:efficientnet-)?(lite\d|b\d)@(\d+)(?:x(\d+))?(?::(\d(?:-\d)*))?$")


@dataclasses.dataclass(frozen=True)
class Candidate:
    """A recipe: what the full run changes in the config."""

    backbone: str
    image_size: tuple[int, int]
    out_layers: tuple[int, ...]

    @property
    def name(self) -> str:
        h, w = self.image_size
        size = f"{h}" if h == w else f"{h}x{w}"
        short = self.backbone.replace("efficientnet-", "")
        return f"{short}@{size}:{'-'.join(map(str, self.out_layers))}"

    @property
    def slug(self) -> str:
        return re.sub(r"[^a-z0-9-]+", "_", self.name)

    def apply(self, config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
        out = config.copy_and_resolve_references()
        out.model.backbone = self.backbone
        out.data.image_size = tuple(self.image_size)
        out.model.out_layers = tuple(self.out_layers)
        return out

    def cost(self, config: ml_collections.ConfigDict) -> float:
        """Relative head training cost: feature positions x backbone channels."""
        spec = efficientnet_spec(self.backbone)
        ends = spec.layer_blocks()
        channels = sum(spec.blocks[ends[layer]].out_ch for layer in self.out_layers)
        stride = config.model.out_stride
        return (self.image_size[0] // stride) * (self.image_size[1] // stride) * channels


def parse_candidate(text: str, default_layers: Sequence[int]) -> Candidate:
    """'lite1@256', 'lite0@288x224:3-4', 'efficientnet-b0@224' -> Candidate."""
    match = _CANDIDATE.match(text.strip())
    if not match:
        raise SelectionError(
            f"config.select: cannot read candidate {text!r}; write BACKBONE@SIZE[xWIDTH][:STAGES],"
            " e.g. lite1@224 or lite0@288x224:3-4"
        )
    short, h, w, stages = match.groups()
    backbone = f"efficientnet-{short}"
    if backbone not in VARIANTS:
        raise SelectionError(f"config.select: unknown backbone in {text!r}")
    layers = tuple(int(s) for s in stages.split("-")) if stages else tuple(default_layers)
    return Candidate(backbone, (int(h), int(w or h)), layers)


def base_candidate(config: ml_collections.ConfigDict) -> Candidate:
    """The config's own recipe (always a candidate)."""
    return Candidate(
        config.model.backbone, tuple(config.data.image_size), tuple(config.model.out_layers)
    )


def candidates(config: ml_collections.ConfigDict) -> list[Candidate]:
    """The config's own recipe first, then those of `config.select` ('auto': the default set)."""
    spec = config.select.strip()
    if spec == "auto":
        spec = config.selection.candidates
    base = base_candidate(config)
    out = [base]
    for text in spec.split(","):
        if text.strip():
            c = parse_candidate(text, base.out_layers)
            if c not in out:
                out.append(c)
    return out


def from_record(entry: dict) -> Candidate:
    """The candidate of one entry of a selection record's "candidates"."""
    return Candidate(entry["backbone"], tuple(entry["image_size"]), tuple(entry["out_layers"]))


def competing_kinds(config: ml_collections.ConfigDict) -> list[str]:
    """The model kinds of `selection.kinds` (a comma list), in the order that breaks ties
    (`models.knn.KINDS`: grad, knn, grad+knn) whatever order they are written in."""
    text = config.selection.get("kinds", "grad")
    given = [k.strip() for k in text.split(",") if k.strip()]
    unknown = [k for k in given if k not in KINDS]
    if unknown or not given:
        raise SelectionError(
            f"selection.kinds={text!r}: give one or more of {', '.join(KINDS)}, comma-separated "
            "(e.g. --config.selection.kinds=grad,knn)"
        )
    return [k for k in KINDS if k in given]


def kind_figures(entry: dict) -> dict[str, dict[str, float]]:
    """kind -> figures of one candidate entry of a selection record (or a curve point): its
    "kinds" in tie order (metrics.json sorts keys); a record written before kinds competed
    holds GRAD's figures at its top level."""
    if "kinds" in entry:
        return {k: entry["kinds"][k] for k in KINDS if k in entry["kinds"]}
    return {"grad": {k: entry[k] for k in FIGURE_KEYS}}
