"""What the command-line entry points share: a user mistake is one line on stderr and exit code 2."""

from __future__ import annotations

import sys
from typing import NoReturn


def fail(message: str) -> NoReturn:
    """Prints 'error: <message>' to stderr and exits with code 2."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def refuse_extra_args(argv: list[str]) -> None:
    """Fails on positional arguments left over after the flags (argv[0] is the program)."""
    if len(argv) > 1:
        fail(f"unexpected arguments: {' '.join(argv[1:])}")
