"""Trains Mirasol3B: `python -m mirasol3b.main --config=configs/NAME.py[:arg] --workdir=DIR`.

`--config.key=value` overrides any field; the config is validated before anything compiles.
Several processes (a TPU pod slice, or hosts given `--coordinator_address`, `--num_processes`,
`--process_id`) start `jax.distributed` first: see `mirasol3b/distributed.py` and `--distributed`.
"""

import sys

from absl import app, flags
from ml_collections import config_flags

from mirasol3b import configlib, distributed
from mirasol3b.train.loop import quiet_logging, train

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/tiny.py[:ttm].",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Checkpoints, metrics and evaluations go here; resumes.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    config = _CONFIG.value
    try:
        # A bad config fails here, before the processes of a multi-host job meet; an impossible
        # eval setting fails now, not after training.
        configlib.validate_eval(configlib.validate(config))
    except configlib.ConfigError as e:
        sys.exit(f"error: {e}")
    distributed.maybe_initialize_from_flags()
    from data import pipeline
    from mirasol3b import evaluate
    from mirasol3b.train import checkpoints

    quiet_logging()
    try:
        pipeline.check_eval_split(config)
        train(config, _WORKDIR.value, evaluate_fn=evaluate.evaluate)
    except (FileNotFoundError, configlib.ConfigError, checkpoints.CheckpointMismatchError,
            checkpoints.CheckpointCorruptError, distributed.NotSharedError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    app.run(main, flags_parser=configlib.parse_flags)
