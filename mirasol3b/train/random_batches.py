"""A fixed pool of random batches in the model's batch format.

Until the SeqIO pipeline is wired in (data issue), `main` trains on these: a real optimisation
problem (the model must memorise random answers given random media), not a stand-in for one.
"""

from __future__ import annotations

import ml_collections
import numpy as np

from mirasol3b.model import samples_per_snippet


def random_batch(config: ml_collections.ConfigDict, rng: np.random.Generator, batch_size: int) -> dict:
    """One batch: random frames and waveform, a random prompt of 8 tokens and a scored answer."""
    m, d = config.model, config.data
    snippets = d.num_frames // m.video.snippet_frames
    size = m.video.image_size
    length = d.text_length
    tokens = rng.integers(3, m.vocab_size, (batch_size, length + 1), dtype=np.int32)
    prompt = min(8, length // 2)
    weights = np.zeros((batch_size, length), np.float32)
    weights[:, prompt:] = 1.0
    return {
        "video": rng.integers(0, 256, (batch_size, d.num_frames, size, size, 3), dtype=np.uint8),
        "audio": rng.normal(scale=0.1, size=(batch_size, snippets * samples_per_snippet(m))).astype(np.float32),
        "media_mask": np.ones((batch_size, snippets), bool),
        "text_inputs": tokens[:, :-1],
        "text_targets": tokens[:, 1:],
        "text_loss_weights": weights,
    }


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
