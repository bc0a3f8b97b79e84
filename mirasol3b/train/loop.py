"""The training loop: sharded state, jitted step, progress a person can read, metrics on disk."""

from __future__ import annotations

import json
import math
import os
import time

import jax
import ml_collections
import numpy as np
from absl import logging
from flax import linen as nn

from mirasol3b import configlib, sharding
from mirasol3b.model import Mirasol3B
from mirasol3b.train.optimizer import make_optimizer
from mirasol3b.train.random_batches import RandomBatches
from mirasol3b.train.state import create_sharded_state
from mirasol3b.train.step import make_train_step


def _global_batch(batch: dict, mesh: jax.sharding.Mesh) -> dict:
    """Host arrays -> global arrays sharded over the data axes (each process passes its own rows)."""
    return {k: jax.make_array_from_process_local_data(sharding.batch_sharding(mesh, v.ndim), v)
            for k, v in batch.items()}


def _format_eta(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def train(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Trains `config.train.num_steps` steps; returns the last step's metrics."""
    configlib.validate(config)
    os.makedirs(workdir, exist_ok=True)
    mesh = sharding.make_mesh(config.mesh_shape)
    data_shards = mesh.shape["data"] * mesh.shape["fsdp"]
    if config.data.batch_size % data_shards:
        raise configlib.ConfigError("data.batch_size", f"a multiple of the data x fsdp mesh size ({data_shards})",
                                    config.data.batch_size)
    local_batch = config.data.batch_size // jax.process_count()
    batches = RandomBatches(config, local_batch, seed=config.seed + jax.process_index())
    logging.info("data: a pool of %d fixed random batches of %d examples", len(batches.pool), local_batch)

    model = Mirasol3B(config.model)
    optimizer = make_optimizer(config.train)
    example = _global_batch(batches[0], mesh)
    state, state_shardings = create_sharded_state(model, optimizer, example, mesh, jax.random.key(config.seed))
    num_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.params))
    print(f"model: {num_params:,} parameters, combiner={config.model.combiner}, mesh={dict(mesh.shape)}", flush=True)

    batch_shardings = jax.tree.map(lambda x: x.sharding, example)
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_AXIS_RULES):
        step_fn = jax.jit(make_train_step(model, optimizer, config.loss),
                          in_shardings=(state_shardings, batch_shardings, None),
                          out_shardings=(state_shardings, None), donate_argnums=0)
        rng = jax.random.key(config.seed + 1)
        metrics_path = os.path.join(workdir, "metrics.jsonl")
        num_steps = config.train.num_steps
        start_step = int(state.step)
        t0, last = time.time(), {}
        with open(metrics_path, "a") as metrics_file:
            for step in range(start_step, num_steps):
                state, metrics = step_fn(state, _global_batch(batches[step], mesh), rng)
                done = step + 1
                if step == start_step:  # the first step compiles; time the rest
                    jax.block_until_ready(metrics)
                    t0 = time.time()
                if done % config.train.log_every == 0 or done == num_steps:
                    last = {k: float(v) for k, v in jax.device_get(metrics).items()}
                    if not math.isfinite(last["loss"]):
                        raise FloatingPointError(f"loss is {last['loss']} at step {done}; stopping")
                    timed = done - start_step - 1
                    rate = timed / max(time.time() - t0, 1e-9)
                    speed = f"{rate:.2f} steps/s  ETA {_format_eta((num_steps - done) / rate)}" if timed else "compiled"
                    print(f"step {done}/{num_steps}  loss {last['loss']:.4f}  text {last['text_loss']:.4f}  "
                          f"latent {last['latent_loss']:.4f}  tok_acc {last['token_accuracy']:.3f}  {speed}",
                          flush=True)
                    metrics_file.write(json.dumps({"step": done, **last}) + "\n")
                    metrics_file.flush()
    return last
