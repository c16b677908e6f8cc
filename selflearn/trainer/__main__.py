"""`python -m selflearn.trainer ARGS`: the same command as `selflearn train ARGS` (selflearn/trainer/cli.py),
for where the `selflearn` script is not on the PATH (local mode runs its trainer subprocess so)."""

import sys

from ..cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
