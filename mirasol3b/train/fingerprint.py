"""Two checksums per array, written with a checkpoint and checked when it is read back: they catch
damage TensorStore reads without complaint, on any mesh."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from mirasol3b.errors import CheckpointCorruptError
from mirasol3b.train.tree_diff import flat


def _leaf_fingerprint(x: jax.Array) -> jax.Array:
    """Two uint32 checksums of `x`'s bits: their sum, and their sum weighted by a hash of each
    element's position. Integer sums mod 2**32 are exact in any order, so the result does not
    depend on the sharding (a checkpoint restored onto another mesh checks against the same)."""
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    if x.dtype == jnp.bool_:
        words = x.astype(jnp.uint32)
    else:
        unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}[x.dtype.itemsize]
        words = jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)  # 8 bytes: a trailing (2,)
    index = jnp.zeros(words.shape, jnp.uint32)
    stride = 1
    for axis in reversed(range(words.ndim)):
        index = index + jax.lax.broadcasted_iota(jnp.uint32, words.shape, axis) * jnp.uint32(stride % 2**32)
        stride *= words.shape[axis]
    weights = index * jnp.uint32(0x9E3779B1) + jnp.uint32(0x7F4A7C15)
    return jnp.stack([jnp.sum(words, dtype=jnp.uint32), jnp.sum(words * weights, dtype=jnp.uint32)])


# One program per leaf shape, dtype and sharding (20 for the tiny model's 456 state arrays), not one
# over the whole tree: that compiled in 7 s on CPU against 2 s for these, and every new sharding
# (a restore onto another mesh) compiled it again.
_leaf_fingerprint_fn = jax.jit(_leaf_fingerprint)


def fingerprint(tree) -> dict[str, list[int]]:
    """'path' -> [sum, weighted sum] for every array leaf of `tree` (computed where it lives)."""
    # One leaf at a time: hundreds of small collective programs in flight at once can starve
    # XLA:CPU's rendezvous of threads (it aborted the process after 40 s on 8 host devices).
    sums = jax.tree.map(lambda x: np.asarray(_leaf_fingerprint_fn(x)), tree)
    return {path: [int(v) for v in np.asarray(leaf)] for path, leaf in flat(sums).items()}


def verify(restored, expected: dict[str, list[int]], prefix: str = "") -> None:
    got = fingerprint(restored)
    bad = sorted(p for p, v in got.items() if expected.get(prefix + p) != v)
    if bad:
        raise CheckpointCorruptError(
            f"{len(bad)} of {len(got)} arrays differ from the fingerprint written at save time: "
            + ", ".join(prefix + p for p in bad[:5]) + (" ..." if len(bad) > 5 else ""))
