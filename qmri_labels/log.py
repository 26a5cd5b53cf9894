"""The toolkit's logger and how the command-line tools configure it.

Library code logs progress and information to ``logging.getLogger("qmri_labels")`` (or a
child of it) and never configures logging itself; an application decides what to show. The
command-line tools call :func:`configure_cli_logging` once: INFO messages to stderr by default,
``--quiet`` shows warnings and errors only, ``--verbose`` adds DEBUG messages.
"""

from __future__ import annotations

import logging
import sys

LOGGER_NAME = "qmri_labels"
logger = logging.getLogger(LOGGER_NAME)


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time of each message (test runners and
    notebooks replace it), and marks itself as the CLI's handler."""

    _qmri_cli = True

    def __init__(self):
        super().__init__(sys.stderr)

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


def configure_cli_logging(quiet: bool = False, verbose: bool = False) -> logging.Logger:
    """Send the toolkit's messages to stderr at the level the flags ask for (idempotent)."""
    if quiet and verbose:
        raise ValueError("--quiet and --verbose exclude each other")
    level = logging.WARNING if quiet else (logging.DEBUG if verbose else logging.INFO)
    for handler in list(logger.handlers):
        if getattr(handler, "_qmri_cli", False):
            logger.removeHandler(handler)
    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter("%(message)s" if not verbose else "%(levelname)s %(name)s: %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False
    return logger


def add_verbosity_flags(parser) -> None:
    """``--quiet`` and ``--verbose`` on an argparse parser (mutually exclusive)."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--quiet", action="store_true", help="warnings and errors only; no progress bar")
    group.add_argument("--verbose", action="store_true", help="also debug messages")
