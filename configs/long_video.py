"""Paper-sized Mirasol3B on 512 frames (T = 32 snippets of 16 frames): the same parameters as
`configs/mirasol3b.py`, whose variants (`:ttm`) it accepts; long videos only add snippets."""

from configs import mirasol3b
from mirasol3b import configlib


def get_config(arg: str | None = None):
    config = mirasol3b.get_config(arg)
    config.data.num_frames = 512
    # 4x the media tokens per clip: a quarter of the clips keeps the tokens per step [ours].
    config.data.batch_size = config.data.batch_size // 4
    return configlib.validate(config).lock()
