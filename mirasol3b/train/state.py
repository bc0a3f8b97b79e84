"""The train state, created already sharded: eval_shape -> logical specs -> jit(init, out_shardings)."""

from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn

from mirasol3b import configlib, sharding
from mirasol3b.model import samples_per_snippet


def example_batch(config, batch_size: int, abstract: bool = True) -> dict:
    """The model batch of `config` (`config.data`'s clip and text length): `ShapeDtypeStruct`s,
    or zeros if not `abstract`. Params do not depend on the batch size."""
    m, d = config.model, config.data
    snippets = d.num_frames // m.video.snippet_frames
    shapes = {
        "media_mask": ((batch_size, snippets), np.bool_),
        "text_inputs": ((batch_size, d.text_length), np.int32),
        "text_targets": ((batch_size, d.text_length), np.int32),
        "text_loss_weights": ((batch_size, d.text_length), np.float32),
    }
    if m.use_video:
        size = m.video.image_size
        shapes["video"] = ((batch_size, d.num_frames, size, size, 3), np.uint8)
    if m.use_audio:
        shapes["audio"] = ((batch_size, snippets * samples_per_snippet(m)), np.float32)
    make = jax.ShapeDtypeStruct if abstract else np.zeros
    return {k: make(shape, dtype) for k, (shape, dtype) in shapes.items()}


def check_batch_shapes(batch: dict, config) -> None:
    """Raises `ConfigError` if a batch's per-example shapes are not `example_batch(config)`'s: a
    dataset built at another geometry than the config's would otherwise fail deep in the model."""
    for key, want in example_batch(config, 1).items():
        got = tuple(np.shape(batch.get(key, want))[1:])
        if got != tuple(want.shape[1:]):
            raise configlib.ConfigError(
                f"the input pipeline's {key!r} is {got} per example, the config's model takes "
                f"{tuple(want.shape[1:])}: the dataset was built at another geometry than the config's "
                "(model.video.image_size and fps, model.audio.sample_rate, data.num_frames, data.text_length). "
                "Rebuild it at the config's, or set those fields to the dataset's.")


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    opt_state: Any


def abstract_state(model: nn.Module, optimizer: optax.GradientTransformation, example_batch: dict):
    """The boxed (logically annotated) abstract state, and its init function; nothing is allocated.

    `example_batch` may hold arrays or `jax.ShapeDtypeStruct`s: only shapes and dtypes are used.
    """
    shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), example_batch)

    def init(rng):
        batch = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
        variables = model.init({"params": rng, "dropout": rng}, batch, train=False)
        params = variables["params"]
        return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                          opt_state=optimizer.init(nn.unbox(params)))
    return jax.eval_shape(init, jax.random.key(0)), init


def _is_spec(x) -> bool:
    return isinstance(x, jax.sharding.PartitionSpec)


def state_shardings(abstract, mesh: jax.sharding.Mesh):
    """NamedShardings for every leaf of the state, from the logical axis rules.

    An optimizer leaf whose path ends with a parameter's path and that has the parameter's shape
    (Adam's moments: `...mu['text_decoder']['logits']['kernel']`) is sharded like that parameter;
    the rest (step, counts) are replicated. Without this the moments, created from unboxed
    params, would be replicated on every chip: 2x the params' memory per chip instead of 2/fsdp.
    """
    specs = nn.get_partition_spec(abstract)
    flat_params = jax.tree_util.tree_flatten_with_path(specs.params, is_leaf=_is_spec)[0]
    param_specs = {jax.tree_util.keystr(path): spec for path, spec in flat_params}
    param_shapes = {jax.tree_util.keystr(path): leaf.shape for path, leaf in
                    jax.tree_util.tree_flatten_with_path(nn.unbox(abstract.params))[0]}

    def opt_spec(path, spec, leaf):
        for start in range(len(path)):
            key = jax.tree_util.keystr(path[start:])
            if key in param_specs and param_shapes[key] == leaf.shape:
                return param_specs[key]
        return spec

    opt_specs = jax.tree_util.tree_map_with_path(opt_spec, specs.opt_state, abstract.opt_state, is_leaf=_is_spec)
    return sharding.logical_sharding(specs.replace(opt_state=opt_specs), mesh)


def create_sharded_state(model: nn.Module, optimizer: optax.GradientTransformation, example_batch: dict,
                         mesh: jax.sharding.Mesh, rng: jax.Array):
    """Initialises params and optimizer state directly into their shardings.

    Returns (state with plain arrays, state shardings).
    """
    abstract, init = abstract_state(model, optimizer, example_batch)
    shardings = state_shardings(abstract, mesh)
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_AXIS_RULES):
        state = jax.jit(lambda r: nn.unbox(init(r)), out_shardings=shardings)(rng)
    return state, shardings
