"""KolektorSDD (electrical commutator surfaces, cracks) in the MVTec AD layout.

    python benchmarks/datasets/kolektorsdd.py --source=PATH --out=OUT [--force]

Source: the Kolektor Surface-Defect Dataset of ViCoS / Kolektor Group
(https://www.vicos.si/resources/kolektorsdd/; 399 grayscale images of 50 commutators, 52 of them
with a crack), read from the GitHub re-distribution
https://github.com/stoy95536/KolektorSDD_Yolov8_Datasets, commit
81e5cf333010730a05f11d1c0357bc0f24ecf502: 399 grayscale JPEGs (500 px wide, 1240-1270 px high),
renamed 000.jpg-398.jpg and spread over Datasets/images/{train,val}/, and for each a YOLO
segmentation label (Datasets/labels/...): empty for a defect-free image, else one
`0 x1 y1 x2 y2 ...` line per defect, the outer contour of the original label bitmap in
coordinates normalised by the image size. The original kos folder names (one per commutator)
are lost in that copy, and it holds only 383 distinct images: 16 files are byte-identical to
others (000-007 = 143-150 and 096-103 = 223-230, so two commutators were copied twice, and
presumably two others are missing); the duplicates are left out.

Licence: the original dataset is released under "Creative Commons
Attribution-NonCommercial-ShareAlike 4.0 International" (CC BY-NC-SA 4.0), non-commercial use
only; the GitHub copy states no licence of its own.

Citation: D. Tabernik, S. Sela, J. Skvarc, D. Skocaj, "Segmentation-based deep-learning approach
for surface-defect detection", Journal of Intelligent Manufacturing 31, 759-776 (2020).

Layout: one category `commutator`. The copy's train/val folders are ignored (they are the
YOLO converter's, not the authors' split). The 333 distinct defect-free images (empty label) are
split 80/20 into train/good (266) and test/good (67) with numpy default_rng(seed), seed 0 (the
train cap, --max-train 300, is not reached); test/crack holds the 50 distinct defective images,
their masks rasterised from the contours (filled, outline included; holes inside a contour, if
any, are lost). As the commutator of each image is unknown, views of one commutator may fall in
both train and test. Image files are copied unchanged, renamed `<copy's folder>_<number>.jpg`
(e.g. train_005.jpg).
"""

from __future__ import annotations

import mvtec_layout as ml
from PIL import Image

COMMIT = "81e5cf333010730a05f11d1c0357bc0f24ecf502"
CATEGORY = "commutator"


def read_polygons(label, size):
    """Polygons in pixels (x, y) of a YOLO segmentation label file for an image of size (W, H)."""
    width, height = size
    polygons = []
    for line in label.read_text().split("\n"):
        values = [float(v) for v in line.split()[1:]]
        if len(values) >= 6:
            xs = [v * width for v in values[0::2]]
            ys = [v * height for v in values[1::2]]
            polygons.append(list(zip(xs, ys, strict=True)))
    return polygons


def main():
    args = ml.parse_args(__doc__, max_train=300, max_test=0)
    out = ml.prepare_out(args.out, args.force)
    with ml.open_source(args.source, COMMIT) as src:
        good, defective = [], []
        for image in sorted((src / "Datasets" / "images").glob("*/*.jpg")):
            label = src / "Datasets" / "labels" / image.parent.name / f"{image.stem}.txt"
            name = f"{image.parent.name}_{image.name}"
            (defective if label.read_text().strip() else good).append((name, image, label))
        good, dropped_good = ml.drop_duplicates(good, lambda item: item[1])
        defective, dropped_defective = ml.drop_duplicates(defective, lambda item: item[1])
        dropped = [name for name, _, _ in dropped_good + dropped_defective]
        print(f"left out {len(dropped)} image(s) identical to another: {dropped}")
        train, test = ml.split_good(good, args.seed)
        for name, image, _ in ml.cap(train, args.max_train, args.seed):
            ml.place_image(image, out, CATEGORY, "train", "good", name)
        for name, image, _ in test:
            ml.place_image(image, out, CATEGORY, "test", "good", name)
        for name, image, label in ml.cap(defective, args.max_test, args.seed):
            dst = ml.place_image(image, out, CATEGORY, "test", "crack", name)
            with Image.open(image) as im:
                size = im.size
            mask = ml.polygon_mask(size, read_polygons(label, size))
            ml.write_mask(mask, out, CATEGORY, "crack", dst.stem)
    counts = ml.check_and_count(out)
    ml.write_source_note(
        out,
        f"""
# KolektorSDD in MVTec AD layout

Made by benchmarks/datasets/kolektorsdd.py (grad_jax) from the KolektorSDD copy at
github.com/stoy95536/KolektorSDD_Yolov8_Datasets (commit {COMMIT}); seed {args.seed}.
Licence of the original dataset: CC BY-NC-SA 4.0 (non-commercial use only).
Masks are rasterised from the copy's polygon contours of the original label bitmaps.
Counts: {counts}
""",
    )


if __name__ == "__main__":
    main()
