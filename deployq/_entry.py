"""The ``deployq`` command's entry point: the command line, started so that Ctrl-C or SIGTERM at
any moment (also while torch is still being imported) ends it with a one-line message and exit
status 130, every output that was being written cleaned up (deployq.core.files.AtomicOutputs)."""

from __future__ import annotations

import signal
import sys
from typing import Any, NoReturn

INTERRUPTED = 130


def _terminate(signum: int, frame: Any) -> NoReturn:
    raise KeyboardInterrupt


def _interrupted() -> NoReturn:
    print("deployq: interrupted; nothing was published", file=sys.stderr)
    sys.exit(INTERRUPTED)


def main() -> None:
    signal.signal(signal.SIGTERM, _terminate)  # like Ctrl-C: unwind, so temporaries are removed
    try:
        import deployq.core.progress  # noqa: F401  (first: its clock is the command's start, for -v)
        import click

        from deployq.cli import main as cli
    except KeyboardInterrupt:
        _interrupted()
    try:
        status = cli.main(prog_name="deployq", standalone_mode=False)
    except click.exceptions.Abort:  # click's form of KeyboardInterrupt
        _interrupted()
    except KeyboardInterrupt:
        _interrupted()
    except click.ClickException as err:
        err.show()
        sys.exit(err.exit_code)
    sys.exit(status if isinstance(status, int) else 0)
