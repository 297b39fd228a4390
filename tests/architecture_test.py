"""The import graph reads as the design: `.ci/check_imports.py` on the package, and on small
packages that break each of its rules."""

import importlib.util
import textwrap

import pytest

from tests.conftest import ROOT

_spec = importlib.util.spec_from_file_location("check_imports", ROOT / ".ci" / "check_imports.py")
check_imports = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(check_imports)


def test_the_package_has_layers_that_point_down_and_no_cycle():
    assert check_imports.check(ROOT / "grad_jax") == []


def _package(tmp_path, files: dict[str, str]):
    root = tmp_path / "grad_jax"
    for name, text in {"__init__.py": "", **files}.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    return root


@pytest.mark.parametrize(
    "files, expected",
    [
        # a cycle inside one layer
        (
            {
                "training/loop.py": "from grad_jax.training import calibration\n",
                "training/calibration.py": "import grad_jax.training.loop\n",
            },
            "import cycle: training.calibration -> training.loop -> training.calibration",
        ),
        # a lower layer importing a higher one
        (
            {"models/model.py": "from grad_jax.training import loop\n", "training/loop.py": ""},
            "models.model (models) imports training.loop (training), a higher layer",
        ),
        # a relative import resolves to the same rule
        ({"errors.py": "from . import config\n", "config.py": ""}, "higher layer"),
        # a module nobody placed
        ({"misc.py": "x = 1\n"}, "misc: not in any layer"),
        # a project import hidden in a function
        (
            {"training/loop.py": "def f():\n    from grad_jax import errors\n", "errors.py": ""},
            "training.loop imports errors inside a function",
        ),
    ],
)
def test_each_rule_is_enforced(tmp_path, files, expected):
    problems = check_imports.check(_package(tmp_path, files))
    assert any(expected in line for line in problems), problems


def test_allowed_lazy_imports_pass(tmp_path):
    files = {
        "serve.py": "def main():\n    from grad_jax.serving import service\n",
        "serving/service.py": "",
    }
    assert check_imports.check(_package(tmp_path, files)) == []
