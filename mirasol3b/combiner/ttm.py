"""Token Turing Machine Combiner: a memory read and written with TokenLearner, carried over snippets.

One step, memory M (memory_size tokens), this snippet's tokens I:
  read     Z  = TokenLearner_m([M | I])
  process  O  = transformer(Z)          -> the snippet's m combined tokens
  write    M' = TokenLearner_mem([M | I | O])
The memory starts at zeros and flows from snippet t to t+1 only, so outputs stay causal in time.

Three options of ours (docs/streaming.md "Long clips" has what they are for and what they measured):
`segment_sizes` (per-modality read and write: output j and memory slot j select from the memory
and modality j % n's tokens, slot j also from the outputs of that modality, rather than from all
tokens); `write="gated"`: M' = M + g * (TokenLearner_mem(...) - M), a learnt per-channel update
gate, rather than the paper's M' = TokenLearner_mem(...); and `snippet_positions`: the snippet's
index, sinusoidal (no parameters), added to its tokens, so what is written can say when.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn

from mirasol3b.combiner.token_learner import TokenLearner
from mirasol3b.layers import LayerNorm, LearnedPositions, TransformerSpec, TransformerStack, sinusoidal
from mirasol3b.layers.projection import dense

WRITES = ("replace", "gated")
# The update gate starts mostly shut, sigmoid(-2) = 0.12, as an LSTM's forget gate starts open: the
# memory holds by default and learns when to take a new event in.
_GATE_OFFSET = -2.0


def selection_mask(sources: jax.Array, num_readers: int, num_segments: int) -> jax.Array:
    """bool `[tokens, num_readers]`: reader j may select token i when `sources[i]` is -1 (shared: the
    memory) or `j % num_segments`."""
    reads = jnp.arange(num_readers) % num_segments
    return (sources[:, None] < 0) | (sources[:, None] == reads[None, :])


class _TTMStep(nn.Module):
    """(memory [batch, memory_size, width], (tokens [batch, tokens, width], valid [batch]))
    -> (memory', outputs [batch, num_outputs, width])."""

    spec: TransformerSpec
    num_outputs: int
    memory_size: int
    token_learner_hidden: int
    segment_sizes: tuple[int, ...] | None = None
    write: str = "replace"
    deterministic: bool = True

    @nn.compact
    def __call__(self, memory: jax.Array, inputs: tuple[jax.Array, jax.Array]):
        tokens, valid = inputs
        s = self.spec
        learner = lambda n, name: TokenLearner(n, self.token_learner_hidden, dtype=s.compute_dtype,  # noqa: E731
                                               param_dtype=s.weight_dtype, name=name)
        positions = lambda n, name: LearnedPositions(n, param_dtype=s.weight_dtype, name=name)  # noqa: E731

        read_mask = write_mask = None
        if self.segment_sizes is not None:
            n = len(self.segment_sizes)
            token_sources = jnp.concatenate([jnp.full((size,), i) for i, size in enumerate(self.segment_sizes)])
            memory_sources = jnp.full((self.memory_size,), -1)
            read_mask = selection_mask(jnp.concatenate([memory_sources, token_sources]), self.num_outputs, n)
            write_sources = jnp.concatenate([memory_sources, token_sources, jnp.arange(self.num_outputs) % n])
            write_mask = selection_mask(write_sources, self.memory_size, n)

        read_in = jnp.concatenate([memory, tokens], axis=1)
        read_in = positions(read_in.shape[1], "read_positions")(read_in)
        z = learner(self.num_outputs, "read")(read_in, read_mask, deterministic=self.deterministic)
        out = TransformerStack(s, name="process")(z, deterministic=self.deterministic)

        write_in = jnp.concatenate([memory, tokens, out], axis=1)
        write_in = positions(write_in.shape[1], "write_positions")(write_in)
        new_memory = learner(self.memory_size, "write")(write_in, write_mask, deterministic=self.deterministic)
        if self.write == "gated":
            both = LayerNorm(dtype=s.compute_dtype, param_dtype=s.weight_dtype, name="gate_norm")(
                jnp.concatenate([memory, new_memory], axis=-1))
            gate = jax.nn.sigmoid(dense(memory.shape[-1], ("embed", "mlp"), s.compute_dtype, s.weight_dtype,
                                        "gate")(both) + _GATE_OFFSET)
            new_memory = memory + gate * (new_memory - memory)
        elif self.write != "replace":
            raise ValueError(f"write must be one of {WRITES}, got {self.write!r}")
        # A padded snippet leaves the memory as it was.
        new_memory = jnp.where(valid[:, None, None], new_memory, memory)
        return new_memory, out


class TTMCombiner(nn.Module):
    """`tokens [batch, snippets, tokens, width]`, `media_mask [batch, snippets]`
    -> `[batch, snippets, num_outputs, width]`; with `return_memory`, also the memory after the
    last snippet, `[batch, memory_size, width]`.

    `memory` (default zeros) is the memory before the first snippet: a stream carries it from one
    call to the next (with `first_snippet`, the index of the call's first snippet), and calls over
    snippets 0..t-1 then t give what one call over 0..t gives.

    Scans over snippets; with `spec.scan_layers=False` the snippets are unrolled instead: the same
    weights for every snippet either way, but the inner stack's params then sit under
    `layers_<i>` rather than one stacked `layers` (as for every stack), so a checkpoint of one
    does not restore into the other.
    """

    spec: TransformerSpec
    num_outputs: int
    memory_size: int
    token_learner_hidden: int
    # Token counts of the modalities in the order they are concatenated: per-modality read and write
    # (see the module docstring). None: every output and memory slot selects from all tokens.
    segment_sizes: tuple[int, ...] | None = None
    write: str = "replace"  # one of WRITES
    snippet_positions: bool = False

    @nn.compact
    def __call__(self, tokens: jax.Array, media_mask: jax.Array | None = None, *, memory: jax.Array | None = None,
                 first_snippet: jax.Array | int = 0, return_memory: bool = False, deterministic: bool = True):
        b, t = tokens.shape[:2]
        if self.snippet_positions:  # `first_snippet`: the index of tokens[:, 0] (a stream's push count)
            when = sinusoidal(first_snippet + jnp.arange(t), tokens.shape[-1])
            tokens = tokens + when[None, :, None].astype(tokens.dtype)
        if media_mask is None:
            media_mask = jnp.ones((b, t), bool)
        step_fields = dict(spec=self.spec, num_outputs=self.num_outputs, memory_size=self.memory_size,
                           token_learner_hidden=self.token_learner_hidden, segment_sizes=self.segment_sizes,
                           write=self.write, deterministic=deterministic)
        if memory is None:
            memory = self.initial_memory(b, tokens.shape[-1], tokens.dtype)
        valid = media_mask.astype(bool)
        if self.spec.scan_layers:
            step = nn.scan(
                _TTMStep,
                variable_broadcast="params",
                split_rngs={"params": False, "dropout": True},
                in_axes=1,
                out_axes=1,
            )(**step_fields, name="step")
            memory, outputs = step(memory, (tokens, valid))
        else:
            # Unrolled (XLA's cost analysis counts a while-loop body once). One step module called
            # per snippet shares its params exactly as the broadcast scan does: same tree.
            step = _TTMStep(**step_fields, name="step")
            outputs = []
            for i in range(t):
                memory, out = step(memory, (tokens[:, i], valid[:, i]))
                outputs.append(out)
            outputs = jnp.stack(outputs, axis=1)
        outputs = nn.with_logical_constraint(outputs, ("batch", "snippets", "tokens", "embed"))
        return (outputs, memory) if return_memory else outputs

    def initial_memory(self, batch: int, width: int, dtype=jnp.float32) -> jax.Array:
        """The memory before the first snippet: zeros `[batch, memory_size, width]`."""
        return jnp.zeros((batch, self.memory_size, width), dtype)
