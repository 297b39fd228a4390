"""grad_jax against a PyTorch implementation of the same model, timed side by side in one run.

    python benchmarks/side_by_side.py --config=configs/unified.py --batch=8 [--rounds=3]

The PyTorch model is the one the parity tests build (tests/torch_reference.py: the
efficientnet_pytorch backbone, MFCN, the CRAD head), with the same config, batch and thread
count. Like the official code, its backbone runs *all* of EfficientNet (every block, the conv
head and the classifier) and throws the unused part away; "torch_truncated" runs only up to the
last block used, which is what grad_jax does. Measurements alternate between the frameworks for
`--rounds` rounds and the ratios of medians are printed as one JSON object. Random weights.

Training "with the cache": grad_jax trains the head from cached backbone features; PyTorch is
timed both on the same head-only work ("torch_head") and on the full reference step, which
re-runs the frozen backbone every step ("torch_full").
"""

from __future__ import annotations

import json
import os
import pathlib
import sys
import time

import numpy as np
from absl import app, flags
from ml_collections import config_flags

from grad_jax.config import CONFIG_DIR, resolve_config_flags
from grad_jax.inference import device_program
from grad_jax.models.model import ModelVariables
from grad_jax.runs import run_folder
from grad_jax.runs.train_state import TrainState
from grad_jax.training import feature_cache

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

FLAGS = flags.FLAGS


def _define_flags() -> None:
    """Only when run as a program, so that other scripts can import build_torch."""
    config_flags.DEFINE_config_file("config", os.path.join(CONFIG_DIR, "unified.py"), "Config.")
    flags.DEFINE_integer("batch", 8, "Images per step.")
    flags.DEFINE_integer("rounds", 3, "Alternating measurement rounds.")
    flags.DEFINE_integer("steps", 3, "Timed calls per measurement.")
    flags.DEFINE_string("out", None, "Also write the JSON here.")


def build_torch(config, torch):
    from grad_jax.models.efficientnet import efficientnet_spec
    from tests import torch_reference as ref

    m = config.model
    spec = efficientnet_spec(m.backbone)
    blocks = [spec.layer_blocks()[layer] for layer in m.out_layers]
    strides = [2**layer for layer in m.out_layers]
    channels = sum(spec.blocks[b].out_ch for b in blocks)
    h, w = config.data.image_size
    size = spec.output_size((h, w), blocks[0])
    factor = strides[0] // m.out_stride
    head = ref.TorchCRAD(
        channels, (size[0] * factor, size[1] * factor), m.local_resol, m.global_resol, m.layers,
        m.ch_exp, m.out_stride,
    )  # fmt: skip
    backbone = ref.efficientnet(m.backbone, 64)
    return ref.TorchGrad(backbone, blocks, strides, m.out_stride, head), spec


def main(argv) -> int:
    del argv
    import jax
    import torch

    from grad_jax.benchmark import cpu_info, time_call
    from grad_jax.devices import sharding
    from grad_jax.training import loop
    from grad_jax.training.optim import make_optimizer

    threads = int(os.environ.get("GRAD_JAX_BENCH_THREADS", os.cpu_count() or 1))
    torch.set_num_threads(threads)
    config = FLAGS.config.copy_and_resolve_references()
    config.model.random_backbone = True
    config.model.kind = "grad"  # PyTorch runs GRAD; random weights hold no kNN bank
    b = FLAGS.batch
    h, w = config.data.image_size
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (b, h, w, 3), dtype=np.uint8)

    # --- grad_jax
    variables = ModelVariables.from_model(run_folder.create_model(config))
    mesh = sharding.make_mesh()
    predict = device_program.make_predict_fn(variables, config, mesh)
    tx, _ = make_optimizer(config.train, 100, variables.params)
    state = sharding.replicate(TrainState.create(variables.params, variables.batch_stats, tx), mesh)
    backbone = sharding.replicate(variables.backbone, mesh)
    shapes = feature_cache.feature_shapes(variables, config)
    feats = {f"feature_{i}": rng.random((b,) + s, np.float32) for i, s in enumerate(shapes)}
    jax_steps = {
        "train": (loop.make_train_step(variables, tx, mesh, False, 0), {"image": images}),
        "train_cached": (loop.make_train_step(variables, tx, mesh, True, 0), feats),
    }
    holder = {"state": state}

    def jax_train(kind):
        step, local = jax_steps[kind]
        batch = sharding.global_batch(local, mesh)

        def run():
            holder["state"], metrics = step(holder["state"], backbone, batch)
            jax.block_until_ready(metrics["loss"])

        return run

    # --- PyTorch
    model, spec = build_torch(config, torch)
    mean, std = spec.normalize
    x = (images.astype(np.float32) - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    x = torch.from_numpy(np.ascontiguousarray(np.transpose(x, (0, 3, 1, 2))))
    opt = torch.optim.AdamW(
        [
            {"params": list(model.reconstruction.query.parameters()), "lr": 0.1},
            {
                "params": [
                    p for n, p in model.reconstruction.named_parameters() if "query" not in n
                ],
                "lr": 1e-3,
            },
        ],
        weight_decay=0.01,
    )
    with torch.no_grad():
        feature_align = model(x)["feature_align"].detach()

    def full_backbone(inp):
        # the official code runs the whole network and discards the head's output
        bb = model.backbone
        return bb._fc(bb._avg_pooling(bb.extract_features(inp)).flatten(1))

    def torch_infer(truncated):
        def run():
            model.eval()
            with torch.no_grad():
                if not truncated:
                    full_backbone(x)
                model(x)

        return run

    def torch_train(kind):
        def run():
            model.train()
            if kind == "head":
                out = model.reconstruction(feature_align)
                target = feature_align
            else:
                with torch.no_grad():
                    full_backbone(x)
                out = model(x)
                target = out["feature_align"]
            loss = ((out["feature_rec"] - target) ** 2).mean()
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.reconstruction.parameters(), 0.1)
            opt.step()

        return run

    cases = {
        "jax_infer": lambda: predict(images),
        "torch_infer_full": torch_infer(False),
        "torch_infer_truncated": torch_infer(True),
        "jax_train_cached": jax_train("train_cached"),
        "torch_train_head": torch_train("head"),
        "jax_train": jax_train("train"),
        "torch_train_full": torch_train("full"),
    }
    for fn in cases.values():  # warm up / compile
        fn()
    samples = {k: [] for k in cases}
    for _ in range(FLAGS.rounds):
        for k, fn in cases.items():
            time.sleep(1.0)  # let the other framework's worker threads go idle first
            samples[k].append(time_call(fn, FLAGS.steps, warm_up=False))
    ips = {k: b / float(np.median(v)) for k, v in samples.items()}
    result = {
        "config_backbone": config.model.backbone,
        "ch_exp": config.model.ch_exp,
        "batch": b,
        "threads": threads,
        **cpu_info(),
        "images_per_s": ips,
        "ratios": {
            "infer_vs_torch_full": ips["jax_infer"] / ips["torch_infer_full"],
            "infer_vs_torch_truncated": ips["jax_infer"] / ips["torch_infer_truncated"],
            "train_cached_vs_torch_head": ips["jax_train_cached"] / ips["torch_train_head"],
            "train_cached_vs_torch_full": ips["jax_train_cached"] / ips["torch_train_full"],
            "train_vs_torch_full": ips["jax_train"] / ips["torch_train_full"],
        },
        "random_weights": True,
    }
    text = json.dumps(result, indent=1)
    print(text)
    if FLAGS.out:
        pathlib.Path(FLAGS.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    _define_flags()
    app.run(main, argv=resolve_config_flags(sys.argv))
