"""Video encoder: a ViT over spatio-temporal tubes of raw frames, run on each snippet alone."""

from __future__ import annotations

import einops
import jax
import jax.numpy as jnp
from flax import linen as nn

from mirasol3b.layers import TransformerSpec
from mirasol3b.layers.patches import snippet_vit


class VideoEncoder(nn.Module):
    """`video [batch, frames, height, width, 3]` -> `[batch, snippets, tokens, width]`.

    Frames are uint8 in [0, 255] or float in [0, 1]; they are scaled to [-1, 1] here.
    `frames = snippets * snippet_frames`; each snippet is encoded independently, so a snippet's
    tokens never depend on another snippet's pixels.
    """

    spec: TransformerSpec
    snippet_frames: int
    image_size: int
    tube_frames: int
    patch_size: int


    @nn.compact
    def __call__(self, video: jax.Array, *, deterministic: bool = True) -> jax.Array:
        b, f, h, w, c = video.shape
        if f % self.snippet_frames or h != self.image_size or w != self.image_size or c != 3:
            raise ValueError(
                f"video must be [batch, snippets*{self.snippet_frames}, {self.image_size}, {self.image_size}, 3], "
                f"got {video.shape}")
        x = video.astype(jnp.float32)
        if jnp.issubdtype(video.dtype, jnp.integer):
            x = x / 255.0
        x = x * 2.0 - 1.0
        x = einops.rearrange(
            x, "b (n t pt) (h ph) (w pw) c -> (b n) (t h w) (pt ph pw c)",
            n=f // self.snippet_frames, pt=self.tube_frames, ph=self.patch_size, pw=self.patch_size)
        return snippet_vit(x, b, self.spec, "tube_embedding", deterministic=deterministic)
