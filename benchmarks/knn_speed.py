"""Time the kNN baseline's core on random features: coreset selection, bank size, query time.

    python benchmarks/knn_speed.py                                  # Magnetic Tile scale
    python benchmarks/knn_speed.py --scales=mvtec_b4 --coreset-steps=2000
    python benchmarks/knn_speed.py --projection-dim=128             # PatchCore's approximation

Scales (28 x 28 patches an image, stride 8 at 224 px): `magnetic_tile` is 690 training images
of 152-channel Lite0 features, `mvtec_b4` the 3629 training images of unified MVTec AD with
216-channel B4 features. Prints one JSON object per scale: the coreset's seconds (compilation
included) for the `--fraction` bank, its size in MB (float32), and the seconds a query image
takes in `knn_map` (3x3 aggregation, nearest distances, upsampling; batch `--batch`, after a
warm-up). With `--coreset-steps=S` only the first S centres are selected and the full time is
extrapolated (`coreset_s_extrapolated`): every centre costs the same N x D multiply-adds in the
refreshes, so the time grows linearly with the number of centres.
"""

import argparse
import json
import pathlib
import sys
import time

import jax
import jax.numpy as jnp

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from grad_jax.models import knn

SCALES = {"magnetic_tile": (690, 152), "mvtec_b4": (3629, 216)}
SIDE = 28  # patches per side at 224 px, stride 8


def measure(name: str, args: argparse.Namespace) -> dict:
    images, channels = SCALES[name]
    n = images * SIDE * SIDE
    key = jax.random.key(0)
    features = jax.random.normal(key, (n, channels), jnp.float32).block_until_ready()
    m = knn.coreset_size(n, args.fraction)
    steps = min(m, args.coreset_steps or m)
    start = time.perf_counter()
    indices = knn.greedy_coreset(
        features,
        steps,
        projection_dim=args.projection_dim,
        buffer_size=args.buffer_size,
    ).block_until_ready()
    coreset_s = time.perf_counter() - start
    bank = features[indices]
    if steps < m:  # the query time needs a bank of the full size: pad with random rows
        extra = jax.random.normal(jax.random.key(1), (m - steps, channels), jnp.float32)
        bank = jnp.concatenate([bank, extra])
    del features

    run = jax.jit(lambda x, b: knn.knn_map(x, b, upsample=8))
    queries = jax.random.normal(jax.random.key(2), (args.batch, SIDE, SIDE, channels))
    run(queries, bank).block_until_ready()
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        run(queries, bank).block_until_ready()
        times.append(time.perf_counter() - start)
    result = {
        "scale": name,
        "patches": n,
        "channels": channels,
        "fraction": args.fraction,
        "bank_size": m,
        "bank_mb": round(m * channels * 4 / 2**20, 1),
        "projection_dim": args.projection_dim,
        "buffer_size": args.buffer_size,
        "query_batch": args.batch,
        "query_s_per_image": round(min(times) / args.batch, 4),
        "backend": jax.default_backend(),
    }
    if steps < m:
        result.update(
            coreset_steps=steps,
            coreset_s_measured=round(coreset_s, 1),
            coreset_s_extrapolated=round(coreset_s * m / steps, 1),
        )
    else:
        result["coreset_s"] = round(coreset_s, 1)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scales", default="magnetic_tile", help="comma list of " + str(SCALES))
    parser.add_argument("--fraction", type=float, default=0.1)
    parser.add_argument("--projection-dim", type=int, default=None)
    parser.add_argument("--buffer-size", type=int, default=4096)
    parser.add_argument("--coreset-steps", type=int, default=0, help="0: the whole coreset")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    for name in args.scales.split(","):
        print(json.dumps(measure(name, args)), flush=True)


if __name__ == "__main__":
    main()
