"""`python -m data.builders build data/builders/NAME --config=... [--manual_dir=DIR] --data_dir=DIR`.

TFDS's own `build` command with its own flags (see `tfds_build`); use it where the `tfds` console
script cannot start (it imports apache_beam, which the pinned set does not install).
"""

import sys

from data.builders import tfds_build

if __name__ == "__main__":
    args = sys.argv[1:]
    if args[:1] == ["build"]:
        args = args[1:]
    tfds_build([sys.argv[0]] + args)
