"""DeepPCB (printed circuit boards, template/tested pairs) in the MVTec AD layout.

    python benchmarks/datasets/deeppcb.py --source=PATH --out=OUT [--force]

Source: https://github.com/tangsanli5201/DeepPCB, commit 08e98c4db5922613fb97176eb3d6497d48260cb1
(PCBData/). 1,500 aligned pairs of 640x640 binarised grayscale crops of PCB scans: a
defect-free template image (`<id>_temp.jpg`) and a tested image of the same area (`<id>_test.jpg`)
whose defects (open, short, mousebite, spur, spurious copper, pin hole; 3 to 12 an image, most of
them added artificially by the authors) are annotated as axis-aligned boxes in
`<group>_not/<id>.txt` (`x1 y1 x2 y2 type`).

Licence: the repository carries the "MIT License" (Copyright (c) 2018 tangsanli5201); its README
adds "You can only use this dataset for research purpose."

Citation: S. Tang, F. He, X. Huang, J. Yang, "Online PCB Defect Detector On A New PCB Defect
Dataset", arXiv:1902.06197 (2019).

Layout: one category `pcb`. The source's own split is kept: templates of PCBData/trainval.txt
(1,000 pairs) are the training pool, the pairs of PCBData/test.txt (500) the test pool; each test
pair gives its template to test/good and its tested image to test/defect (one folder, since an
image holds several defect types). Masks are the union of the annotated boxes (so they are
coarse: a box is larger than its defect). Three training templates are byte-identical
(20085159, 20085167, 20085168): only the first is kept. Subsampling (numpy default_rng(seed),
seed 0): 300 of the 998 distinct training templates (--max-train) and 200 of the 500 test pairs
(--max-test), giving train/good 300, test/good 200, test/defect 200. Image files are copied
unchanged (JPEG; a few are stored as RGB, the rest as 8-bit grayscale).
"""

from __future__ import annotations

import re

import mvtec_layout as ml
from PIL import Image

COMMIT = "08e98c4db5922613fb97176eb3d6497d48260cb1"
CATEGORY = "pcb"


def read_pairs(list_file):
    """(image path, annotation path) of each line of trainval.txt / test.txt, as relative
    paths: `groupX/X/<id>.jpg groupX/X_not/<id>.txt`."""
    pairs = []
    for line in list_file.read_text().split("\n"):
        if line.strip():
            image, annotation = line.split()
            pairs.append((image, annotation))
    return pairs


def read_boxes(path):
    """Boxes (x1, y1, x2, y2) of an annotation file; fields separated by spaces or commas."""
    boxes = []
    for line in path.read_text().split("\n"):
        fields = [int(f) for f in re.split(r"[,\s]+", line.strip()) if f]
        if fields:
            boxes.append(tuple(fields[:4]))
    return boxes


def main():
    args = ml.parse_args(__doc__, max_train=300, max_test=200)
    out = ml.prepare_out(args.out, args.force)
    with ml.open_source(args.source, COMMIT) as src:
        data = src / "PCBData"
        train_pool, dropped = ml.drop_duplicates(
            read_pairs(data / "trainval.txt"), lambda p: data / p[0].replace(".jpg", "_temp.jpg")
        )
        names = [image for image, _ in dropped]
        print(f"left out {len(dropped)} training template(s) identical to another: {names}")
        train_pairs = ml.cap(train_pool, args.max_train, args.seed)
        test_pairs = ml.cap(read_pairs(data / "test.txt"), args.max_test, args.seed)
        for image, _ in train_pairs:
            temp = data / image.replace(".jpg", "_temp.jpg")
            ml.place_image(temp, out, CATEGORY, "train", "good", temp.name)
        for image, annotation in test_pairs:
            temp = data / image.replace(".jpg", "_temp.jpg")
            test = data / image.replace(".jpg", "_test.jpg")
            ml.place_image(temp, out, CATEGORY, "test", "good", temp.name)
            ml.place_image(test, out, CATEGORY, "test", "defect", test.name)
            with Image.open(test) as im:
                size = im.size
            mask = ml.box_mask(size, read_boxes(data / annotation))
            ml.write_mask(mask, out, CATEGORY, "defect", test.stem)
    counts = ml.check_and_count(out)
    ml.write_source_note(
        out,
        f"""
# DeepPCB in MVTec AD layout

Made by benchmarks/datasets/deeppcb.py (grad_jax) from github.com/tangsanli5201/DeepPCB
(commit {COMMIT}); seed {args.seed}, max_train {args.max_train}, max_test {args.max_test}.
Licence as stated by the source: MIT License; README: "You can only use this dataset for
research purpose." Masks are the union of the annotated defect boxes.
Counts: {counts}
""",
    )


if __name__ == "__main__":
    main()
