"""The typed description of one transformer stack, shared by every stack in the model."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

# Remat policies by name, so configs can choose one (`remat_policy`): what the backward pass may
# keep instead of recomputing. "none" turns rematerialisation off.
REMAT_POLICIES = {
    "none": None,
    "nothing_saveable": jax.checkpoint_policies.nothing_saveable,
    "everything_saveable": jax.checkpoint_policies.everything_saveable,
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}

DTYPES = ("float32", "bfloat16", "float16")

# How attention's softmax(q k^T) v runs: "xla" (einsums, float32 logits; every backend), "cudnn"
# (jax.nn.dot_product_attention's fused cuDNN kernel on NVIDIA GPUs: the [queries, keys] logits
# never reach memory; 1.5x the paper model's train step on an H200, benchmarks/README.md) or
# "auto": cudnn where it applies (GPU, bf16/fp16, no dropout, head dim <= 128), else xla.
ATTENTION_IMPLS = ("auto", "xla", "cudnn")


def fused_attention_fits(dtype, dropout_rate: float) -> bool:
    """Whether cuDNN's fused attention can run these numerics: a 16-bit dtype, no dropout."""
    return jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16) and not dropout_rate


@dataclasses.dataclass(frozen=True)
class TransformerSpec:
    """Width, depth and numerics of one stack of pre-LayerNorm transformer blocks."""

    width: int
    depth: int
    num_heads: int
    mlp_dim: int
    head_dim: int = 0  # 0: width // num_heads
    dropout_rate: float = 0.0
    dtype: str = "float32"
    param_dtype: str = "float32"
    remat_policy: str = "none"
    scan_layers: bool = True
    attention_impl: str = "auto"

    def __post_init__(self):
        for name in ("width", "depth", "num_heads", "mlp_dim"):
            if getattr(self, name) <= 0:
                raise ValueError(f"TransformerSpec.{name} must be positive, got {getattr(self, name)}")
        if not self.head_dim and self.width % self.num_heads:
            raise ValueError(f"TransformerSpec: num_heads {self.num_heads} must divide width {self.width}")
        if self.remat_policy not in REMAT_POLICIES:
            raise ValueError(f"TransformerSpec.remat_policy must be one of {sorted(REMAT_POLICIES)}, "
                             f"got {self.remat_policy!r}")
        if self.attention_impl not in ATTENTION_IMPLS:
            raise ValueError(f"TransformerSpec.attention_impl must be one of {ATTENTION_IMPLS}, "
                             f"got {self.attention_impl!r}")
        if self.attention_impl == "cudnn" and not fused_attention_fits(self.dtype, self.dropout_rate):
            raise ValueError("TransformerSpec.attention_impl 'cudnn' needs a bfloat16/float16 dtype and no "
                             f"dropout, got dtype {self.dtype!r}, dropout_rate {self.dropout_rate}")
        for name in ("dtype", "param_dtype"):
            if getattr(self, name) not in DTYPES:
                raise ValueError(f"TransformerSpec.{name} must be one of {DTYPES}, got {getattr(self, name)!r}")

    @property
    def heads_dim(self) -> int:
        return self.head_dim or self.width // self.num_heads

    @property
    def compute_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.dtype)

    @property
    def weight_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.param_dtype)

    def replace(self, **changes) -> "TransformerSpec":
        return dataclasses.replace(self, **changes)
