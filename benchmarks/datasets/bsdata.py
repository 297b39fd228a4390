"""BSData (ball screw drive spindle surfaces, pitting) in the MVTec AD layout.

    python benchmarks/datasets/bsdata.py --source=PATH --out=OUT [--force]

Source: https://github.com/2Obe/BSData, commit 7204b28a621733c01cd75899ed9ea27f6ea0b9e3. 1,104 RGB
JPEG photos (data/) of ball screw drive spindles taken every few hours on a test bench while
pitting developed, and labelme polygon annotations of the "Pitting" regions (label/, 394
files, one for every image showing pitting). Names read
`01_<yymmddhhmmss>_<position>_<angle>_crop_<n>.jpg`; a (position, angle, crop) triple is one
place on the spindle filmed over time.

Licence: the repository carries the "Attribution-ShareAlike 4.0 International" licence
(CC BY-SA 4.0); the Data in Brief article describing the data is CC BY 4.0.

Citation: T. Schlagenhauf, M. Landwehr, "Industrial machine tool component surface defect
dataset", Data in Brief 39, 107643 (2021), doi:10.1016/j.dib.2021.107643 (arXiv:2103.13003).

Layout: one category `ball_screw`, from the `crop_2` view only (1130x460 px, 855 images: 57
per place, 15 places). Defect-free: the unannotated images of a place taken before its first
annotated one (the pitting not yet started; a place never annotated counts whole); they are
split 80/20 into train/good and test/good with numpy default_rng(seed), seed 0, and train/good
is capped at 300 (--max-train). test/pitting: every annotated crop_2 image (167), masks rasterised
from the polygons. Left out: unannotated images taken after a place's first pitting (its pitting
may be hidden or just unlabelled: not safely defect-free), the `crop_1` view (1540x645, later in
the runs: 158 annotated, 22 not) and the other BSD type (69 large images, all annotated), which
have no defect-free counterparts of their own. Image files are copied unchanged.
"""

from __future__ import annotations

import json
from collections import defaultdict

import mvtec_layout as ml
from PIL import Image

COMMIT = "7204b28a621733c01cd75899ed9ea27f6ea0b9e3"
CATEGORY = "ball_screw"
VIEW = "crop_2"


def place_and_time(stem):
    """('<position>_<angle>', '<yymmddhhmmss>') of a `01_<time>_<pos>_<angle>_crop_<n>` stem."""
    parts = stem.split("_")
    return f"{parts[2]}_{parts[3]}", parts[1]


def main():
    args = ml.parse_args(__doc__, max_train=300, max_test=0)
    out = ml.prepare_out(args.out, args.force)
    with ml.open_source(args.source, COMMIT) as src:
        annotated = {p.stem: p for p in (src / "label").glob("*.json")}
        by_place = defaultdict(list)
        for image in sorted((src / "data").glob(f"*_{VIEW}.jpg")):
            place, time = place_and_time(image.stem)
            by_place[place].append((time, image))
        good, defective = [], []
        for images in by_place.values():
            started = False
            for _, image in sorted(images):
                if image.stem in annotated:
                    started = True
                    defective.append(image)
                elif not started:
                    good.append(image)
        train, test = ml.split_good(good, args.seed)
        for image in ml.cap(train, args.max_train, args.seed):
            ml.place_image(image, out, CATEGORY, "train", "good", image.name)
        for image in test:
            ml.place_image(image, out, CATEGORY, "test", "good", image.name)
        for image in ml.cap(defective, args.max_test, args.seed):
            ml.place_image(image, out, CATEGORY, "test", "pitting", image.name)
            label = json.loads(annotated[image.stem].read_text())
            with Image.open(image) as im:
                size = im.size
            if size != (label["imageWidth"], label["imageHeight"]):
                raise SystemExit(f"{image}: size {size} differs from its label's")
            polygons = [s["points"] for s in label["shapes"] if s["shape_type"] == "polygon"]
            mask = ml.polygon_mask(size, polygons)
            ml.write_mask(mask, out, CATEGORY, "pitting", image.stem)
    counts = ml.check_and_count(out)
    print(f"defect-free {VIEW} images found: {len(good)} (split 80/20, train capped)")
    ml.write_source_note(
        out,
        f"""
# BSData (ball screw drive pitting) in MVTec AD layout

Made by benchmarks/datasets/bsdata.py (grad_jax) from github.com/2Obe/BSData
(commit {COMMIT}); view {VIEW}; seed {args.seed}, max_train {args.max_train}.
Licence as stated by the source: Attribution-ShareAlike 4.0 International (CC BY-SA 4.0).
Defect-free = unannotated images of a spindle place taken before its first pitting annotation.
Counts: {counts}
""",
    )


if __name__ == "__main__":
    main()
