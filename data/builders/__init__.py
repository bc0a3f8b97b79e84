"""TFDS builders: `local_media` (a folder of the user's media plus annotations) and the build report
(`report.py`) they share. Each builder lives in its own folder so `tfds build data/builders/NAME`
finds it; importing this package does not import them (TFDS would register them twice).

A tensorflow-datasets 4.9.10 gap, worked around here for every builder:
  `DatasetBuilder.code_path` (read by every `download_and_prepare`, for checksums) evaluates
    `importlib_resources.abc.Traversable` for a builder defined in a package, and that backport is
  only installed on Python < 3.9: it fails with "No module named 'importlib_resources'". Builders
  inherit `FileCodePath` first to answer it from the class's file.
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
