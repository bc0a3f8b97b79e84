"""Combiners: fuse one snippet's audio and video tokens into m compact latents."""

from mirasol3b.combiner.fusion import ModalityFusion
from mirasol3b.combiner.token_learner import TokenLearner
from mirasol3b.combiner.transformer import TransformerCombiner
from mirasol3b.combiner.ttm import TTMCombiner

__all__ = ["ModalityFusion", "TTMCombiner", "TokenLearner", "TransformerCombiner"]
