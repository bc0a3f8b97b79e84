"""TFDS builders: `local_media` (a folder of the user's media plus annotations) and the build report
(`report.py`) they share. Each builder lives in its own folder so `tfds build data/builders/NAME`
finds it; importing this package does not import them (TFDS would register them twice).

Two tensorflow-datasets 4.9.10 gaps in this environment, worked around here for every builder:
  * `DatasetBuilder.code_path` (read by every `download_and_prepare`, for checksums) evaluates
    `importlib_resources.abc.Traversable` for a builder defined in a package, and that backport is
    only installed on Python < 3.9: it fails with "No module named 'importlib_resources'". Builders
    inherit `FileCodePath` first to answer it from the class's file.
  * the `tfds` command imports all its sub-commands, and `convert_format` needs apache_beam at
    import time (not installed); `tfds_build` runs the `build` command alone, same flags.
"""

from __future__ import annotations

import inspect


class _ClassFile:
    """Descriptor: the file that defines the class it is read from (`cls.code_path`, `self.code_path`)."""

    def __get__(self, obj, cls):
        from etils import epath

        return epath.Path(inspect.getfile(cls))


class FileCodePath:
    """Mixin (list it before `tfds.core.GeneratorBasedBuilder`): `code_path` is the class's file."""

    code_path = _ClassFile()


def tfds_build(argv: list[str] | None = None) -> None:
    """Runs TFDS's `tfds build` command with the same flags, e.g.
        python -c "from data.builders import tfds_build; tfds_build()" data/builders/local_media \\
            --config=tiny --manual_dir=MEDIA --data_dir=OUT
    """
    from absl import app, logging
    from tensorflow_datasets.scripts.cli import build, cli_utils

    parse = cli_utils.make_flags_parser(build.Args, description="tfds build (without apache_beam)")

    def main(args):
        logging.set_verbosity(logging.INFO)  # as `tfds` does: show TFDS's progress lines
        args.execute()

    app.run(main, argv=argv, flags_parser=parse)
