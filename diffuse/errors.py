"""One-line errors for bad input: the CLI prints them without a traceback and exits non-zero."""

from __future__ import annotations

import functools
import sys

from omegaconf.errors import MissingMandatoryValue


class DiffuseError(ValueError):
    """A problem with the user's input (a config key, a value, a file). Printed as one line."""


def one_line_errors(main):
    """Wrap a CLI entry point: a DiffuseError becomes `error: …` on stderr and exit code 2; so does a required
    key (`???` in the yaml) left out of the command line."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except DiffuseError as err:
            print(f"error: {err}", file=sys.stderr)
            sys.exit(2)
        except MissingMandatoryValue as err:
            key = err.full_key or "a required key"
            print(f"error: {key} is required: give {key}=… on the command line", file=sys.stderr)
            sys.exit(2)

    return wrapper
