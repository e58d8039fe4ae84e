"""``python -m deployq.cli``: the deployq command."""

import sys

from deployq.cli import main

sys.exit(main(prog_name="deployq"))
