"""ELPV (electroluminescence images of solar cells) in the MVTec AD layout, image labels only.

    python benchmarks/datasets/elpv.py --source=PATH --out=OUT [--force]

Source: https://github.com/zae-bayern/elpv-dataset, commit 411fd729dad19511883306aa85e52f1962cba581.
2,624 8-bit grayscale 300x300 PNG images of solar cells cut from EL images of 44 modules
(src/elpv_dataset/data/images/), and src/elpv_dataset/data/labels.csv giving for each image a
defect probability (0, 1/3, 2/3 or 1, the experts' confidence that the cell is defective) and
the module type (mono- or polycrystalline). No masks.

Licence: the images are licensed under the "Creative Commons Attribution-NonCommercial-ShareAlike
4.0 International License" (CC BY-NC-SA 4.0; the accompanying code is Apache-2.0).

Citation: S. Deitsch, V. Christlein, S. Berger, C. Buerhop-Lutz, A. Maier, F. Gallwitz,
C. Riess, "Automatic classification of defective photovoltaic module cells in electroluminescence
images", Solar Energy 185, 455-468 (2019); C. Buerhop-Lutz et al., "A Benchmark for Visual
Identification of Defective Solar Cells in Electroluminescence Imagery", EU PVSEC 2018.

Layout: two categories, `mono` and `poly` (module type). Probability 0: defect-free, split
80/20 into train/good and test/good with numpy default_rng(seed), seed 0, train/good then capped
at 300 (--max-train; mono 470 -> 300, poly 736 -> 300). Probability 1: test/defective, capped at
200 per category (--max-test; mono 313, poly 402 before the cap). Probability 2/3:
test/likely_defective (mono 56, poly 50). Probability 1/3 (mono 117, poly 178; unsure, more likely
functional than not) is left out. No ground_truth/ folders: pixel metrics do not apply. Image
files are copied unchanged.
"""

from __future__ import annotations

import mvtec_layout as ml

COMMIT = "411fd729dad19511883306aa85e52f1962cba581"
FOLDERS = {0.0: "good", 2 / 3: "likely_defective", 1.0: "defective"}  # 1/3: left out


def read_labels(path):
    """{(module type, folder): [relative image path, ...]} from labels.csv."""
    groups = {}
    for line in path.read_text().split("\n"):
        if not line.strip():
            continue
        image, probability, kind = line.split()
        folder = next((f for p, f in FOLDERS.items() if abs(float(probability) - p) < 1e-6), None)
        if folder is not None:
            groups.setdefault((kind, folder), []).append(image)
    return groups


def main():
    args = ml.parse_args(__doc__, max_train=300, max_test=200)
    out = ml.prepare_out(args.out, args.force)
    with ml.open_source(args.source, COMMIT) as src:
        data = src / "src" / "elpv_dataset" / "data"
        groups = read_labels(data / "labels.csv")
        for (kind, folder), images in sorted(groups.items()):
            if folder == "good":
                train, test = ml.split_good(images, args.seed)
                for image in ml.cap(train, args.max_train, args.seed):
                    ml.place_image(data / image, out, kind, "train", "good", image.split("/")[-1])
            else:
                test = ml.cap(images, args.max_test, args.seed)
            for image in test:
                ml.place_image(data / image, out, kind, "test", folder, image.split("/")[-1])
    counts = ml.check_and_count(out)
    ml.write_source_note(
        out,
        f"""
# ELPV (solar cell EL images) in MVTec AD layout

Made by benchmarks/datasets/elpv.py (grad_jax) from github.com/zae-bayern/elpv-dataset
(commit {COMMIT}); seed {args.seed}, max_train {args.max_train}, max_test {args.max_test}.
Licence of the images as stated by the source: CC BY-NC-SA 4.0. Image labels only (no masks):
probability 0 -> good, 2/3 -> likely_defective, 1 -> defective, 1/3 left out.
Counts: {counts}
""",
    )


if __name__ == "__main__":
    main()
