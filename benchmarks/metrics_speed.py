"""Time the pixel metrics on a 600-image category at 224x224 (30M pixels).

    python benchmarks/metrics_speed.py

Prints the seconds AUPRO and pixel AUROC take (moved out of the tests: timings are not
pass/fail criteria there).
"""

import pathlib
import sys
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from grad_jax.evaluation import metrics


def main() -> None:
    rng = np.random.default_rng(0)
    n, size = 600, 224
    maps = rng.random((n, size, size), dtype=np.float32)
    masks = np.zeros((n, size, size), bool)
    for i in range(0, n, 2):
        for _ in range(3):
            y, x = rng.integers(0, size - 24, 2)
            h, w = rng.integers(2, 24, 2)
            masks[i, y : y + h, x : x + w] = True
    maps[masks] += 0.5
    start = time.perf_counter()
    pro = metrics.aupro(masks, maps)
    mid = time.perf_counter()
    auc = metrics.auroc(masks, maps)
    end = time.perf_counter()
    print(
        f"30M pixels: aupro {mid - start:.2f} s ({pro:.3f}), "
        f"pixel auroc {end - mid:.2f} s ({auc:.3f})"
    )


if __name__ == "__main__":
    main()
