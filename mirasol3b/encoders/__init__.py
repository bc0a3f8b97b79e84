"""Per-snippet encoders of the time-aligned modalities."""
