"""Trains Mirasol3B: `python -m mirasol3b.main --config=configs/NAME.py[:arg] --workdir=DIR`.

`--config.key=value` overrides any field; the config is validated before anything compiles.
Several processes (a TPU pod slice, or hosts given `--coordinator_address`, `--num_processes`,
`--process_id`) start `jax.distributed` first: see `mirasol3b/distributed.py` and `--distributed`.
"""

from mirasol3b import cli, configlib, distributed

SHARED_FLAGS = cli.Shared(config=cli.REQUIRED,
                          workdir=cli.REQUIRED, workdir_help="Checkpoints, metrics and evaluations go here; resumes.",
                          distributed=True)


def main(args: cli.Args) -> None:
    config = args.config
    # A bad config fails here, before the processes of a multi-host job meet; an impossible eval
    # setting fails now, not after training.
    configlib.validate_eval(configlib.validate(config))
    distributed.maybe_initialize_from_flags(args)
    from mirasol3b_data import pipeline
    from mirasol3b import evaluate
    from mirasol3b.train.loop import train

    cli.quiet_logging()
    pipeline.check_eval_split(config)
    train(config, args.workdir, evaluate_fn=evaluate.evaluate)


if __name__ == "__main__":
    cli.run(main, shared=SHARED_FLAGS)
