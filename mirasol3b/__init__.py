"""Mirasol3B: a multimodal autoregressive model for time-aligned and contextual modalities."""

__version__ = "0.1.0"
