"""A fixed pool of random batches in the model's batch format, with the pipeline's resumable position.

What the tests and benchmarks train on when the data is not the point: a real optimisation problem
(the model must memorise random answers given random media), without TensorFlow or a dataset.
"""

from __future__ import annotations

import ml_collections
import numpy as np

from mirasol3b.train.state import example_batch


def random_batch(config: ml_collections.ConfigDict, rng: np.random.Generator, batch_size: int) -> dict:
    """One batch of `example_batch`'s shapes: random frames and waveform, all snippets real, a
    random prompt of up to 8 tokens followed by a scored random answer."""
    shapes = example_batch(config, batch_size)
    length = config.data.text_length
    tokens = rng.integers(3, config.model.vocab_size, (batch_size, length + 1), dtype=np.int32)
    weights = np.zeros((batch_size, length), np.float32)
    weights[:, min(8, length // 2):] = 1.0
    batch = {"media_mask": np.ones(shapes["media_mask"].shape, bool), "text_inputs": tokens[:, :-1],
             "text_targets": tokens[:, 1:], "text_loss_weights": weights}
    if "video" in shapes:
        batch["video"] = rng.integers(0, 256, shapes["video"].shape, dtype=np.uint8)
    if "audio" in shapes:
        batch["audio"] = rng.normal(scale=0.1, size=shapes["audio"].shape).astype(np.float32)
    return batch


class RandomBatches:
    """Cycles through `pool_size` fixed random batches (deterministic for `seed`).

    An iterator with the data pipeline's `get_state`/`set_state`, so the loop can checkpoint it.
    """

    def __init__(self, config: ml_collections.ConfigDict, batch_size: int, pool_size: int = 4, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.pool = [random_batch(config, rng, batch_size) for _ in range(pool_size)]
        self.position = 0

    def __getitem__(self, step: int) -> dict:
        return self.pool[step % len(self.pool)]

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        batch = self[self.position]
        self.position += 1
        return batch

    def get_state(self) -> dict:
        return {"position": self.position}

    def set_state(self, state: dict) -> None:
        self.position = int(state["position"])
