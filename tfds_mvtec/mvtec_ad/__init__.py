"""MVTec AD in tfds (`tfds new` layout).

Kept import-free on purpose: `tfds_mvtec.mvtec_ad.layout` must be importable without
tensorflow-datasets. Importing `tfds_mvtec.mvtec_ad.mvtec_ad_dataset_builder` registers the
builders `mvtec_ad` and `mvtec_layout_folder` with tfds.
"""
