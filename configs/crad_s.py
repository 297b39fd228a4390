"""CRAD-S: the unified model with expansion width 216 (experiments/config_crad-s.yaml)."""

from grad_jax.configs import unified


def get_config():
    config = unified.get_config()
    config.model.ch_exp = 216
    return config
