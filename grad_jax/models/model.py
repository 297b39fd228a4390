"""build_model(config): frozen EfficientNet backbone + MFCN neck + CRAD head, as one NNX module.

The model has no file I/O: it is built with random weights; pretrained backbone weights are put
in by `grad_jax.weights.state_dicts` and trained weights by `grad_jax.runs.checkpointing`.
`ModelVariables` is its functional view: a graph definition and flat variable dicts, the form
jitted code works on.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from grad_jax.models.efficientnet import EfficientNet
from grad_jax.models.grad_head import GradHead, HeadConfig, HeadOutputs
from grad_jax.models.neck import mfcn


class GradModel(nnx.Module):
    """images `[B, H, W, 3]` with values 0..255 (uint8 or float) -> `HeadOutputs`."""

    def __init__(
        self,
        *,
        backbone: str,
        out_layers: Sequence[int],
        out_stride: int,
        image_size: Sequence[int],
        head: dict,
        dtype: str = "float32",
        depthwise_impl: str = "auto",
        rngs: nnx.Rngs,
    ):
        self.backbone = EfficientNet(
            backbone,
            tuple(out_layers),
            dtype=dtype,
            depthwise_impl=depthwise_impl,
            rngs=rngs,
        )
        self.out_stride = out_stride
        self.image_size = tuple(image_size)
        spec = self.backbone.spec
        sizes = [spec.output_size(self.image_size, b) for b in self.backbone.out_blocks]
        strides = self.backbone.out_strides
        feature_hw = tuple(
            n * (strides[0] // out_stride) for n in sizes[0]
        )  # the neck brings every stage to the first stage's size times its factor
        self.head = GradHead(
            HeadConfig(
                channels=sum(self.backbone.out_channels),
                feature_hw=feature_hw,
                upsample=out_stride,
                dtype=dtype,
                depthwise_impl=depthwise_impl,
                **head,
            ),
            rngs=rngs,
        )

    def extract(self, images: jax.Array) -> list[jax.Array]:
        """The frozen backbone's stage outputs (what the feature cache stores)."""
        return self.backbone(images)

    def neck(self, stage_features: Sequence[jax.Array]) -> jax.Array:
        return mfcn(stage_features, self.backbone.out_strides, self.out_stride)

    def from_features(
        self,
        stage_features: Sequence[jax.Array],
        *,
        train: bool = False,
        noise_key: jax.Array | None = None,
    ) -> HeadOutputs:
        return self.head(self.neck(stage_features), train=train, noise_key=noise_key)

    def __call__(
        self, images: jax.Array, *, train: bool = False, noise_key: jax.Array | None = None
    ) -> HeadOutputs:
        return self.from_features(self.extract(images), train=train, noise_key=noise_key)


def pool_features(stage_features: Sequence[jax.Array]) -> jax.Array:
    """Stage outputs `[B, h_i, w_i, C_i]` -> `[B, sum C_i]` float32: each averaged over positions.

    An image's summary for class recognition (nearest class centre); the head does not use it.
    """
    return jnp.concatenate(
        [jnp.mean(f.astype(jnp.float32), axis=(1, 2)) for f in stage_features], axis=-1
    )


HEAD_KEYS = (
    "local_resol",
    "global_resol",
    "layers",
    "ch_exp",
    "mse_lamb",
    "cos_lamb",
    "mse_coef",
    "noise_std",
    "noise_prob",
    "bn_group_size",
)


def build_model(config: ml_collections.ConfigDict, seed: int = 0) -> GradModel:
    """A GradModel with random weights from a full config (uses `config.model`, `config.data`)."""
    m = config.model
    if isinstance(config.data.image_size, str):
        raise ValueError(
            f"data.image_size={config.data.image_size!r} must be resolved to (height, width) "
            "before a model is built (training measures 'auto' on the training images); give "
            "the size explicitly here, e.g. --config.data.image_size='(224,224)'"
        )
    return GradModel(
        backbone=m.backbone,
        out_layers=tuple(m.out_layers),
        out_stride=m.out_stride,
        image_size=tuple(config.data.image_size),
        head={k: m[k] for k in HEAD_KEYS},
        dtype=m.dtype,
        depthwise_impl=m.depthwise_impl,
        rngs=nnx.Rngs(params=seed),
    )


def split_model(model: GradModel):
    """(graphdef, backbone state, trainable params, batch stats): the functional boundary."""
    return nnx.split(model, nnx.PathContains("backbone"), nnx.Param, nnx.BatchStat)


def merge(graphdef, *states):
    """nnx.merge on fresh Variable objects.

    The module may then update its batch statistics inside any trace (jit, grad) without
    mutating, or tripping over, the caller's state objects.
    """
    return nnx.merge(graphdef, *jax.tree.map(lambda leaf: leaf, states))


def to_flat(state: nnx.State) -> dict[str, jax.Array]:
    """An nnx.State as a flat dict keyed 'head.bottlenecks.0.expand.kernel' (arrays only).

    Training, optimiser, sharding and checkpoint code all work on these flat dicts: they are
    plain pytrees with string keys, which Orbax and optax handle without special cases.
    """
    return {".".join(map(str, path)): var.get_value() for path, var in nnx.to_flat_state(state)}


def from_flat(template: nnx.State, flat: dict[str, jax.Array]) -> nnx.State:
    """The inverse of `to_flat`, using `template` for the structure and variable types."""
    items = []
    for path, var in nnx.to_flat_state(template):
        items.append((path, var.replace(flat[".".join(map(str, path))])))
    return nnx.from_flat_state(items)


@dataclasses.dataclass
class ModelVariables:
    """A model as a graph definition plus flat variable dicts (the functional boundary), and
    the nearest-neighbour baseline's memory bank once training has made one (`models.knn`)."""

    graphdef: Any
    templates: tuple[Any, Any, Any]  # nnx.State of backbone, params, batch stats
    backbone: dict[str, jax.Array]
    params: dict[str, jax.Array]
    batch_stats: dict[str, jax.Array]
    bank: Any = None  # [M, C] float32 patch features, or None (no baseline)

    @classmethod
    def from_model(cls, model: GradModel) -> ModelVariables:
        graphdef, backbone, params, stats = split_model(model)
        return cls(
            graphdef, (backbone, params, stats), to_flat(backbone), to_flat(params), to_flat(stats)
        )

    def replace(self, **changes: Any) -> ModelVariables:
        """A copy with some of `backbone`, `params`, `batch_stats`, `bank` replaced."""
        return dataclasses.replace(self, **changes)

    def merge(self, backbone=None, params=None, batch_stats=None) -> GradModel:
        """A module from flat dicts (defaults: the stored ones); usable inside jit."""
        tb, tp, ts = self.templates
        return merge(
            self.graphdef,
            from_flat(tb, self.backbone if backbone is None else backbone),
            from_flat(tp, self.params if params is None else params),
            from_flat(ts, self.batch_stats if batch_stats is None else batch_stats),
        )
