"""One MVTec AD category: --config=configs/per_class.py:bottle (any of the 15).

Same model as configs/unified.py (B4, expansion 864), trained on that class alone.
"""

from grad_jax.configs import default, unified


def get_config(category: str = "bottle"):
    if category not in default.MVTEC_CATEGORIES:
        raise ValueError(
            f"unknown MVTec AD category {category!r}; one of {', '.join(default.MVTEC_CATEGORIES)}"
        )
    config = unified.get_config()
    config.data.categories = (category,)
    config.train.batch_size = 16
    config.model.bn_group_size = 0
    return config
