"""levi_jax: LEVI (layer-wise ensemble of different views) in JAX/Flax."""

from setuptools import find_packages, setup

SHIPPED = {"levi_jax.gin": "gin",
           "levi_jax.demo_checkpoint": "experiments/checkpoints/synthetic_t5_small"}

setup(
    name="levi_jax",
    version="0.1.0",
    description=(
        "LEVI: generalizable fine-tuning by a layer-wise ensemble of a frozen "
        "T5X encoder and a small task model, in JAX/Flax."
    ),
    # The top-level gin/ and the demo's checkpoint ship inside the package, so
    # `--gin_file=runs/train.gin` and the demo work from any directory after a
    # plain `pip install .` (levi_jax.data.paths.shipped_path finds them).
    packages=find_packages(include=["levi_jax", "levi_jax.*"]) + list(SHIPPED),
    package_dir=SHIPPED,
    package_data={"levi_jax": ["py.typed"], "levi_jax.gin": ["**/*.gin"],
                  "levi_jax.demo_checkpoint": ["**/*"]},
    python_requires=">=3.11",
    # Lower bounds are the versions the test suite has run against.
    install_requires=[
        "jax>=0.10.2",
        "flax>=0.12.8",
        "optax>=0.2.8",
        "orbax-checkpoint>=0.12.8",
        "tensorstore>=0.1.86",
        "msgpack>=1.0",
        "safetensors>=0.8.0",  # Hugging Face weights (levi_jax.checkpoints.hf).
        "numpy>=2.0",
        "gin-config>=0.5.0",
        "absl-py>=2.1",
    ],
    extras_require={
        # Data pipeline and the trainer's metric writers (TensorFlow based).
        "data": [
            "seqio>=0.0.20",
            "tensorflow>=2.21",
            "tensorflow-text>=2.21",
            "tensorflow-datasets>=4.9.10",
            "sentencepiece>=0.2.0",
            "importlib_resources>=6.0",  # TFDS needs it to prepare (download) datasets.
            "clu>=0.0.12",
            "tensorboard>=2.20",
            "matplotlib>=3.9",
        ],
        # PyPI dependencies of T5X's own trainer (`python -m t5x.train`) beyond ours;
        # t5x itself (with airio and jestimator) is installed from its repository
        # (README, "Run under T5X").
        "t5x": [
            "grain>=0.2.18",
            "cached_property>=2.0.1",
            "fiddle>=0.3.1",
            "tensorboard>=2.20",
        ],
        "test": [
            "pytest>=8.0",
            "pytest-xdist>=3.5",  # make test runs the files on 2 workers
            "seqio>=0.0.20",
            "tensorflow>=2.21",
            "tensorflow-text>=2.21",
            "tensorflow-datasets>=4.9.10",
            "sentencepiece>=0.2.0",
            "importlib_resources>=6.0",  # TFDS needs it to prepare (download) datasets.
            "clu>=0.0.12",
            "tensorboard>=2.20",
            "matplotlib>=3.9",
        ],
    },
)
