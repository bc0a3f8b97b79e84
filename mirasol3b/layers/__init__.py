"""Building blocks shared by every stack in the model: one of each."""

from mirasol3b.layers import masks
from mirasol3b.layers.attention import Attention
from mirasol3b.layers.block import TransformerBlock
from mirasol3b.layers.embeddings import LearnedPositions, TokenEmbedding, sinusoidal
from mirasol3b.layers.mlp import Mlp
from mirasol3b.layers.norms import LayerNorm
from mirasol3b.layers.spec import TransformerSpec
from mirasol3b.layers.stack import TransformerStack

__all__ = ["Attention", "LayerNorm", "LearnedPositions", "Mlp", "TokenEmbedding", "TransformerBlock",
           "TransformerSpec", "TransformerStack", "masks", "sinusoidal"]
