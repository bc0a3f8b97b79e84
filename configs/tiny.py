"""Tiny Mirasol3B: trains on a 2-core CPU in minutes. Variants: `configs/tiny.py:ttm`."""

from mirasol3b import configlib


def get_config(arg: str | None = None):
    args = configlib.parse_arg(arg, ttm=False)
    config = configlib.base_config()
    if args.ttm:
        config.model.combiner = "ttm"
    return configlib.validate(config).lock()
