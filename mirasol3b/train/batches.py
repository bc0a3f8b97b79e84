"""Host batches -> what the devices get: the keys the model reads, as global arrays over the mesh."""

from __future__ import annotations

import jax
import ml_collections
import numpy as np

from mirasol3b import sharding

# What the train step reads; the pipeline's other keys (prompts, eval metadata) stay on the host.
MODEL_KEYS = ("video", "audio", "media_mask", "text_inputs", "text_targets", "text_loss_weights")


def model_batch(batch: dict, config: ml_collections.ConfigDict, keys: tuple[str, ...] = MODEL_KEYS) -> dict:
    """`batch`'s `keys` that the model reads: media it does not use, and host-side metadata (eval
    strings), never go to the devices."""
    skip = {"video"} if not config.model.use_video else set()
    skip |= {"audio"} if not config.model.use_audio else set()
    return {k: batch[k] for k in keys if k in batch and k not in skip}


def global_batch(batch: dict, mesh: jax.sharding.Mesh) -> dict:
    """Host arrays -> global arrays sharded over the data axes (each process passes its own rows)."""
    sharding.check_batch_split(mesh)
    return {k: jax.make_array_from_process_local_data(sharding.batch_sharding(mesh, np.ndim(v)), np.asarray(v))
            for k, v in batch.items()}
