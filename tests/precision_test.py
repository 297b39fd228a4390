"""model.precision reaches the programs that run the model: training step and prediction."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from grad_jax.configs import default, tiny, unified

from grad_jax import errors
from grad_jax.config import validate_config
from grad_jax.devices import sharding
from grad_jax.devices.precision import PRECISIONS, with_precision
from grad_jax.inference import device_program
from grad_jax.models import scoring
from grad_jax.models.model import ModelVariables, build_model
from grad_jax.runs.train_state import TrainState
from grad_jax.training import loop
from grad_jax.training.optim import make_optimizer


def test_default_and_unified_configs_use_tensorfloat32():
    assert default.get_config().model.precision == "tensorfloat32"
    assert unified.get_config().model.precision == "tensorfloat32"
    config = tiny.get_config()
    config.model.precision = "fp8"
    with pytest.raises(errors.ConfigError, match="model.precision='fp8'"):
        validate_config(config)
    assert PRECISIONS == ("default", "bfloat16", "tensorfloat32", "float32")


def test_products_are_lowered_with_the_configured_precision():
    x = jnp.ones((4, 4), jnp.float32)
    seen = []

    def f(a):
        seen.append(jax.config.jax_default_matmul_precision)
        return a @ a

    marks = (("float32", "HIGHEST"), ("tensorfloat32", "HIGH"), ("bfloat16", "DEFAULT"))
    for precision, mark in marks:
        g = with_precision(jax.jit(f), precision)
        np.testing.assert_array_equal(np.asarray(g(x)), np.full((4, 4), 4.0))
        assert seen[-1] == precision
        assert f"precision = [{mark}, {mark}]" in g.lower(x).as_text()


def test_training_step_and_prediction_use_the_config():
    config = tiny.get_config()
    config.model.precision = "float32"
    variables = ModelVariables.from_model(build_model(config))
    mesh = sharding.make_mesh()
    tx, _ = make_optimizer(config.train, 4, variables.params)
    step = loop.make_train_step(variables, tx, mesh, False, 0, config.model.precision)
    state = TrainState.create(variables.params, variables.batch_stats, tx)
    batch = {"image": jnp.zeros((4, 64, 64, 3), jnp.uint8), "stop": jnp.zeros((4,), jnp.int32)}
    text = step.lower(state, variables.backbone, batch).as_text()
    assert "precision = [HIGHEST, HIGHEST]" in text and "DEFAULT" not in text
    assert text.count("precision = [") > 10  # every product of the step
    seen = []
    original = scoring.smooth

    def smooth(*args):
        seen.append(jax.config.jax_default_matmul_precision)
        return original(*args)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(scoring, "smooth", smooth)
        device_program.make_predict_fn(variables, config)(np.zeros((1, 64, 64, 3), np.uint8))
    assert seen == ["float32"]
