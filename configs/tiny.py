"""A tiny model for tests and smoke runs: random backbone, 64-px images, narrow head."""

from grad_jax.configs import default


def get_config():
    config = default.get_config()
    config.model.random_backbone = True
    config.model.layers = 2
    config.model.ch_exp = 16
    config.model.local_resol = 4
    config.model.global_resol = 2
    config.data.image_size = (64, 64)
    config.train.batch_size = 4
    config.train.epochs = 2
    config.train.log_every_steps = 1
    config.eval.batch_size = 4
    config.eval.smooth_size = 5
    config.eval.score_pool = 8
    return config
