"""The `local_media` dataset (`tfds build data/builders/local_media --config=tiny --manual_dir=...`)."""

from .local_media import GEOMETRIES, Builder, LocalMediaConfig  # noqa: F401
