"""The `synthetic_avqa` dataset (`tfds build data/builders/synthetic_avqa --config=tiny`)."""

from .synthetic_avqa import GEOMETRIES, Builder, SyntheticAvqaConfig  # noqa: F401
