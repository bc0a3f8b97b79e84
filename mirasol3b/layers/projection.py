"""Every weight contraction of the model: `Projection` (several input/output axes, the kernel in its
real shape) and `Dense` (flax's, through the same `matmul`).

(Flax's DenseGeneral initialises a flattened 2-D kernel, which clashes with 3-D logical axis
names under a mesh; `Projection` initialises `[*in_dims, *out_dims]` directly.)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn

from mirasol3b.layers.initializers import default_kernel_init, logical


def matmul(x: jax.Array, kernel: jax.Array, num_input_axes: int = 1, precision=None) -> jax.Array:
    """`x [..., *in] . kernel [*in, *out] -> [..., *out]` as one 2-D product `[rows, in] @ [in, out]`.

    Why 2-D: XLA:CPU lowers the weight gradient autodiff derives from an N-D dot_general (a
    contraction over every leading axis) with a transposed copy of the activations' gradient and
    a slow form of its Eigen dot; from the 2-D form it is one plain `[rows, in]^T [rows, out]` dot.
    The train step at benchmarks/peer_train_step.py's scale is 1.07-1.13x faster on CPU.
    Reshaping the leading axes into rows is free (row-major) and keeps their sharding; GPU and
    TPU run the same GEMMs either way.
    """
    in_dims, out_dims = kernel.shape[:num_input_axes], kernel.shape[num_input_axes:]
    if tuple(x.shape[x.ndim - num_input_axes:]) != tuple(in_dims):
        raise ValueError(f"cannot contract x {x.shape} with a kernel {kernel.shape} over {num_input_axes} axes")
    rows = x.reshape(-1, math.prod(in_dims))
    y = jax.lax.dot(rows, kernel.reshape(rows.shape[1], math.prod(out_dims)), precision=precision)
    return y.reshape(*x.shape[:x.ndim - num_input_axes], *out_dims)


def dense_dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
    """`nn.Dense`'s contraction (lhs's last axis with a 2-D kernel's first) through `matmul`."""
    if dimension_numbers != (((lhs.ndim - 1,), (0,)), ((), ())) or rhs.ndim != 2 or preferred_element_type:
        raise ValueError(f"dense_dot_general serves nn.Dense's contraction only, not {dimension_numbers}")
    return matmul(lhs, rhs, 1, precision)


class Dense(nn.Dense):
    """`nn.Dense` (same parameters, same names) contracting through `matmul`."""

    dot_general: Callable | None = dense_dot_general


def dense(features: int, axes: tuple[str, str], dtype, param_dtype, name: str, use_bias: bool = True) -> Dense:
    """`[..., in] -> [..., features]`: the kernel on logical `axes`, the bias (zeros) on `axes[1]`."""
    return Dense(features, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, name=name,
                 kernel_init=logical(default_kernel_init, axes), bias_init=logical(nn.initializers.zeros, axes[1:]))


class Projection(nn.Module):
    """Contracts the last `num_input_axes` axes of `x` with a `[*in, *features]` kernel."""

    features: tuple[int, ...]
    kernel_axes: tuple[str | None, ...]
    num_input_axes: int = 1
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        n_in, n_out = self.num_input_axes, len(self.features)
        in_dims = tuple(x.shape[-n_in:])
        init = nn.initializers.xavier_uniform(in_axis=tuple(range(n_in)),
                                              out_axis=tuple(range(n_in, n_in + n_out)))
        kernel = self.param("kernel", logical(init, self.kernel_axes), in_dims + tuple(self.features),
                            self.param_dtype)
        return matmul(x.astype(self.dtype), kernel.astype(self.dtype), n_in)


def heads_projection(num_heads: int, head_dim: int, dtype, param_dtype, name: str) -> Projection:
    """`[..., embed] -> [..., heads, head_dim]`."""
    return Projection((num_heads, head_dim), ("embed", "heads", "head_dim"), 1, dtype, param_dtype, name=name)


def output_projection(width: int, dtype, param_dtype, name: str, axes: Sequence[str] = ("heads", "head_dim", "embed")):
    """`[..., heads, head_dim] -> [..., width]`."""
    return Projection((width,), tuple(axes), 2, dtype, param_dtype, name=name)
