"""Throughput benchmark: `python -m grad_jax.benchmark --config=configs/unified.py --batch=8`.

Measures, on whatever backend JAX runs on, with the config's model and dtype:
- inference images/s: backbone, neck, head, anomaly map, smoothing and score, jitted;
- training images/s from images (backbone every step) and from cached backbone features;
- FLOPs per image from XLA's cost analysis, and the FLOP/s achieved;
- peak memory (device peak where the backend reports it, else the process's peak RSS).
Weights are random unless --pretrained: throughput does not depend on their values. Prints one
JSON object; --out=FILE writes it too.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from ml_collections import config_flags

FLAGS = flags.FLAGS


def _define_flags() -> None:
    """Flags exist only when run as a program, so importing time_call defines nothing."""
    config_flags.DEFINE_config_file("config", "configs/unified.py", "Config.", lock_config=True)
    flags.DEFINE_integer("batch", 8, "Images per step (global).")
    flags.DEFINE_integer("steps", 5, "Timed iterations after warm-up (the median is reported).")
    flags.DEFINE_bool("pretrained", False, "Load the configured pretrained backbone.")
    flags.DEFINE_string("out", None, "Also write the JSON here.")
    flags.DEFINE_list("parts", ["infer", "train", "train_cached"], "What to time.")


def time_call(fn, steps: int, warm_up: bool = True) -> float:
    """Median seconds per call of `fn` (which must block until done), after one warm-up."""
    if warm_up:
        fn()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def _flops(jitted, *args) -> float | None:
    try:
        analysis = jitted.lower(*args).compile().cost_analysis()
    except Exception:  # noqa: BLE001 - not every backend reports costs
        return None
    if isinstance(analysis, list):
        analysis = analysis[0] if analysis else {}
    value = (analysis or {}).get("flops")
    return float(value) if value else None


def _peak_memory() -> dict[str, float]:
    out = {"host_peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
    try:
        stats = jax.devices()[0].memory_stats() or {}
    except Exception:  # noqa: BLE001
        stats = {}
    if "peak_bytes_in_use" in stats:
        out["device_peak_gb"] = stats["peak_bytes_in_use"] / 2**30
    return out


def run_benchmark(config, batch: int, steps: int, pretrained: bool, parts) -> dict:
    from grad_jax import evaluate, input_pipeline, sharding, train, workdir
    from grad_jax.optim import make_optimizer

    config = config.copy_and_resolve_references()
    if input_pipeline.tiling_on(config):  # the model sees tiles
        with config.ignore_type():
            config.data.image_size = (config.data.tile.size, config.data.tile.size)
    config.model.random_backbone = not pretrained
    config.eval.batch_size = batch
    sharding.check_batch_size(batch, "--batch")
    model = workdir.create_model(config)
    variables = workdir.ModelVariables.from_model(model)
    del model
    mesh = sharding.make_mesh()
    h, w = config.data.image_size
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (batch, h, w, 3), dtype=np.uint8)
    result: dict = {
        "config_backbone": config.model.backbone,
        "ch_exp": config.model.ch_exp,
        "dtype": config.model.dtype,
        "image_size": [h, w],
        "batch": batch,
        "random_weights": not pretrained,
        "backend": jax.default_backend(),
        "devices": jax.device_count(),
        "device_kind": jax.devices()[0].device_kind,
        "host": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "jax_version": jax.__version__,
    }

    if "infer" in parts:
        predict = evaluate.make_predict_fn(variables, config, mesh)
        seconds = time_call(lambda: predict(images), steps)
        result["infer_images_per_s"] = batch / seconds

        def program(backbone, params, stats, x):
            m = variables.merge(backbone, params, stats)
            return m(x).anomaly_map

        flops = _flops(
            jax.jit(program),
            variables.backbone,
            variables.params,
            variables.batch_stats,
            jnp.asarray(images),
        )
        if flops:
            result["flops_per_image"] = flops / batch
            result["infer_flops_per_s"] = flops / seconds

    tx, _ = make_optimizer(config.train, 100, variables.params)

    def fresh_state():
        state = {
            "step": jnp.zeros((), jnp.int32),
            "params": variables.params,
            "batch_stats": variables.batch_stats,
            "opt_state": tx.init(variables.params),
        }
        return sharding.replicate(state, mesh)

    backbone = sharding.replicate(variables.backbone, mesh)
    for part, cached in (("train", False), ("train_cached", True)):
        if part not in parts:
            continue
        step = train.make_train_step(
            variables, tx, mesh, cached, config.seed, config.model.precision
        )
        if cached:
            shapes = train.feature_shapes(variables, config)
            local = {
                f"feature_{i}": rng.random((batch,) + s, np.float32) for i, s in enumerate(shapes)
            }
        else:
            local = {"image": images}
        batch_arrays = sharding.global_batch(local, mesh)
        holder = {"state": fresh_state()}

        def one_step(step=step, batch_arrays=batch_arrays, holder=holder):
            holder["state"], metrics = step(holder["state"], backbone, batch_arrays)
            jax.block_until_ready(metrics["loss"])

        seconds = time_call(one_step, steps)
        result[f"{part}_images_per_s"] = batch / seconds
        flops = _flops(step, holder["state"], backbone, batch_arrays)
        if flops:
            result[f"{part}_flops_per_image"] = flops / batch
            result[f"{part}_flops_per_s"] = flops / seconds
    result.update(_peak_memory())
    return result


def main(argv) -> int:
    del argv
    from grad_jax import cli

    cli.configure_logging()
    with cli.friendly_errors():
        result = run_benchmark(
            FLAGS.config, FLAGS.batch, FLAGS.steps, FLAGS.pretrained, FLAGS.parts
        )
    text = json.dumps(result, indent=1, sort_keys=True)
    print(text)
    if FLAGS.out:
        with open(FLAGS.out, "w", encoding="utf-8") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    _define_flags()
    sys.exit(app.run(main))
