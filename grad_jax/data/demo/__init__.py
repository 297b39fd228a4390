"""A small synthetic MVTec-AD-style dataset, generated locally (numpy + scipy, no download).

:func:`ensure_demo_dataset` builds it on first use into :func:`default_cache_dir` and reuses it
afterwards, so a new user can run the demo config with nothing downloaded.
:func:`generate_demo_dataset` builds any subset, size or seed into a given folder.

Four classes (``DEMO_CLASSES``), three defect types each (``DEMO_DEFECTS``):

============  =======  ====================================================
class         kind     defect types
============  =======  ====================================================
``fabric``    texture  ``hole``, ``stain``, ``thread``
``wood``      texture  ``scratch``, ``crack``, ``hole``
``hex_nut``   object   ``scratch``, ``missing``, ``rust``
``capsule``   object   ``crack``, ``missing``, ``contamination``
============  =======  ====================================================

Normal images vary (texture phase and period, grain warping, object shifts and rotations,
brightness, tint, illumination gradient, sensor noise). Defaults per class: 256 px RGB PNGs,
60 ``train/good``, 15 ``test/good`` and 10 per defect type (105 images, 420 in all, about
15-25 s on two CPU cores), plus one 0/255 mask per defective image, in the MVTec AD layout::

    <root>/<class>/train/good/000.png ...
    <root>/<class>/test/good/000.png ...
    <root>/<class>/test/<defect>/000.png ...
    <root>/<class>/ground_truth/<defect>/000_mask.png   (uint8 0/255, same size as the image)
    <root>/README.txt
    <root>/.complete                                      (JSON marker, written last)

Builds are seeded per image (byte-identical in any order or subset) and atomic.

Modules, bottom to top: ``textures`` (drawing helpers), ``objects`` (normal scenes),
``defects`` (defect painters and each class's defect types), ``build`` (seeded rendering,
the cache folder and writing the dataset).
"""

from grad_jax.data.demo.build import (
    DEMO_VERSION,
    default_cache_dir,
    ensure_demo_dataset,
    generate_demo_dataset,
)
from grad_jax.data.demo.defects import DEMO_CLASSES, DEMO_DEFECTS

__all__ = [
    "DEMO_CLASSES",
    "DEMO_DEFECTS",
    "DEMO_VERSION",
    "default_cache_dir",
    "ensure_demo_dataset",
    "generate_demo_dataset",
]
