"""The command line every entry point shares: its flags, its errors and its logging.

An entry point (`main`, `evaluate`, `answer`, `demo`, `summary`, `aot`) is a thin `main` over the
library:

    def define_flags(fv: flags.FlagValues) -> dict:       # its own flags, besides the shared ones
        return {"split": flags.DEFINE_string("split", None, "...", flag_values=fv)}

    def main(args: cli.Args) -> None:                      # args.config, args.workdir, args.split
        ...

    if __name__ == "__main__":
        cli.run(main, define_flags, config=cli.REQUIRED, workdir=cli.REQUIRED)

- Flags are defined by `run` (or `define`, which a test calls with a fresh `FlagValues`), never
  at import: `--config` (an ml_collections config file; `--config.key=value` overrides any field),
  `--workdir`, the distributed group (`--distributed`, `--coordinator_address`, `--num_processes`,
  `--process_id`: `mirasol3b/distributed.py`), and the entry point's own.
- Every error a user can fix derives from `mirasol3b.errors.Error`: `run` prints `error: <message>`
  and exits with status 1. Any other exception is a bug and keeps its traceback.
- `quiet_logging()` is the one logging set-up.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable

from absl import app, flags
from absl import logging

from mirasol3b import errors

REQUIRED, OPTIONAL = "required", "optional"


class Args(dict):
    """The parsed flags by name (`args.config` or `args["config"]`)."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


@dataclasses.dataclass(frozen=True)
class Shared:
    """Which shared flags an entry point takes, and their help where it differs."""

    config: str | None = None  # REQUIRED, OPTIONAL or None (no --config)
    config_help: str = "Config file, e.g. configs/tiny.py[:ttm]; --config.key=value overrides a field."
    config_default: str | None = None
    workdir: str | None = None
    workdir_help: str = "The run's directory: checkpoints, metrics, evaluations."
    workdir_default: str | None = None
    distributed: bool = False


def define(shared: Shared, define_own: Callable[[flags.FlagValues], dict] | None,
           fv: flags.FlagValues) -> dict:
    """Defines the shared flags `shared` names and the entry point's own in `fv`; -> name: FlagHolder."""
    from ml_collections import config_flags

    holders = {}
    if shared.config:
        holders["config"] = config_flags.DEFINE_config_file(
            "config", shared.config_default, shared.config_help, flag_values=fv, lock_config=True)
    if shared.workdir:
        holders["workdir"] = flags.DEFINE_string("workdir", shared.workdir_default, shared.workdir_help, flag_values=fv)
    if shared.distributed:
        from mirasol3b import distributed

        holders.update(distributed.define_flags(fv))
    required = [name for name, how in (("config", shared.config), ("workdir", shared.workdir)) if how == REQUIRED]
    if required:
        flags.mark_flags_as_required(required, flag_values=fv)
    if define_own is not None:
        holders.update(define_own(fv))
    return holders


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, where an override of a field the config lacks (`--config.modle.dtype=...`)
    is one line naming it instead of a traceback from inside ml_collections (which raises
    AttributeError or KeyError there), and a config file that cannot be loaded (a wrong path, a bad
    `:variant`) is said now rather than where the program first reads it."""
    try:
        rest = app.parse_flags_with_usage(argv)
    except (AttributeError, KeyError) as e:
        overrides = [a.split("=")[0] for a in argv[1:] if a.startswith("--config.")]
        reason = e
        while reason.args and isinstance(reason.args[0], BaseException):  # a nested field: AttributeError(KeyError)
            reason = reason.args[0]
        text = str(reason.args[0] if reason.args else reason).replace("\n", "; ")
        sys.exit(f"FATAL Flags parsing error: a --config override names a field the config does not have: "
                 f"{text} (overrides given: {', '.join(overrides)})")
    config = flags.FLAGS["config"].value if "config" in flags.FLAGS else None
    if config is not None:
        try:
            getattr(config, "keys")
        except OSError as e:
            sys.exit(f"FATAL Flags parsing error: --config: {e.__cause__ or e}")
    return rest


def quiet_logging() -> None:
    """The one logging set-up: only warnings from absl logging (Orbax and TFDS log every file at
    INFO, burying the progress line), unless `--verbosity` was given."""
    verbosity = flags.FLAGS["verbosity"] if "verbosity" in flags.FLAGS else None
    if verbosity is None or not verbosity.present:
        logging.set_verbosity(logging.WARNING)


def run(main: Callable[[Args], None], define_own: Callable[[flags.FlagValues], dict] | None = None,
        shared: Shared = Shared()) -> None:
    """Defines the flags, parses them, runs `main(args)`; an `errors.Error` ends it with
    `error: <message>` and status 1."""
    holders = define(shared, define_own, flags.FLAGS)

    def absl_main(argv):
        if len(argv) > 1:
            raise app.UsageError(f"unexpected arguments: {argv[1:]}")
        try:
            main(Args({name: holder.value for name, holder in holders.items()}))
        except errors.Error as e:
            sys.exit(f"error: {e}")

    app.run(absl_main, flags_parser=parse_flags)
