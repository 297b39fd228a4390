"""How far unseen normal images and other kinds of part lie from a class centre, on training
images only: the evidence behind `threshold.class_margin` (the rejection of an unknown class).

    python benchmarks/class_margin.py [--config=configs/demo.py] [--root=CATEGORIES_FOLDER]

For every class of the dataset (the embedded demo by default, or a folder of MVTec-layout
categories): the class centre is the mean pooled backbone feature of its training images minus
the held-out share (`threshold.holdout_fraction`, the split training uses), and its spread the
distance of the farthest of those from the centre, as `training.calibration.class_centres`
computes them. Then, in units of that spread, it prints the farthest held-out normal image of the
class (unseen by the centre: how far a new good part may lie) and the nearest training image of
every other class (how near another kind of part comes). A margin between the two keeps every
unseen good part of a known class and rejects the other classes. No test image is read.
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/demo.py")
    parser.add_argument("--root", default="", help="a folder of MVTec-layout categories")
    args = parser.parse_args()

    from grad_jax.config import load_config_file
    from grad_jax.data import input_pipeline
    from grad_jax.evaluation.evaluate import predict_items
    from grad_jax.inference import device_program
    from grad_jax.models.model import ModelVariables
    from grad_jax.runs import run_folder

    config = load_config_file(args.config)
    if args.root:
        config.data.dataset, config.data.root = "folder", args.root
    categories = input_pipeline.open_categories(config)
    names = [c.name for c in categories]
    train_items, held_items = input_pipeline.split_holdout(
        categories, config.threshold.holdout_fraction, config.seed
    )
    variables = ModelVariables.from_model(run_folder.create_model(config))
    pooled_fn = device_program.make_pooled_fn(variables)
    sources = [c.train for c in categories]

    def pooled(items):
        source = input_pipeline.IndexedSource(
            sources, items, config.data.image_size, names, masks=False
        )
        parts = predict_items(pooled_fn, source, config.eval.batch_size, "pooled")
        return np.concatenate([out["pooled"] for _, out in parts]).astype(np.float64)

    train, held = pooled(train_items), pooled(held_items)
    train_labels = np.array([it.category for it in train_items])
    held_labels = np.array([it.category for it in held_items])
    rows = {}
    for c, name in enumerate(names):
        mine = train[train_labels == c]
        centre = mine.mean(axis=0)
        spread = np.linalg.norm(mine - centre, axis=1).max()
        unseen = np.linalg.norm(held[held_labels == c] - centre, axis=1) / spread
        others = np.linalg.norm(train[train_labels != c] - centre, axis=1) / spread
        rows[name] = {
            "training_images": int(len(mine)),
            "held_out_farthest": float(unseen.max()) if unseen.size else None,
            "other_classes_nearest": float(others.min()) if others.size else None,
        }
        print(
            f"{name:>12}: held-out normal images up to {rows[name]['held_out_farthest']:.2f} x "
            f"the spread; other classes' training images from "
            f"{rows[name]['other_classes_nearest']:.2f} x"
        )
    json.dump(rows, sys.stdout, indent=1)
    print()


if __name__ == "__main__":
    main()
