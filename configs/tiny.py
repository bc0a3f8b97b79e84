"""Tiny Mirasol3B: trains on a 2-core CPU in minutes. Variants: `configs/tiny.py:ttm`."""

from mirasol3b import configlib


def get_config(arg: str | None = None):
    args = configlib.parse_arg(arg, ttm=False)
    config = configlib.base_config()
    if args.ttm:
        config.model.combiner = "ttm"
    # The demo's data: synthetic_avqa questions are <= 70 bytes, answers <= 6 (+ BOS and EOS).
    config.data.update(task="synthetic_avqa_tiny", text_length=80, batch_size=32)
    config.model.text_decoder.max_length = 96  # the prompt window plus eval.max_new_tokens
    # ~10 minutes on 2 CPU cores at ~4 steps/s.
    config.train.update(num_steps=2000, learning_rate=3e-3, warmup_steps=100, log_every=50)
    config.checkpoint.update(every_steps=250, keep=2)
    config.eval.update(every_steps=1000)
    return configlib.validate(config).lock()
