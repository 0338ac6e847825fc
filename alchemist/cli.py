"""What every command line shares: a user error is one line on stderr, ``error: <sentence>``, and
exit status 2, never a traceback; and the --config FILE + --key=value shape of the training CLIs.

User errors are ``UserError`` (ConfigError, DataError, CheckpointError, ... say what to fix), a
command-line usage error (``ArgumentParser``), and the OSErrors of a path: not there, not
writable, a full disk. Anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import argparse
import errno
import functools
import json
import sys
from typing import Any, Callable, TypeVar

from alchemist.config import load_config
from alchemist.utils.errors import UserError

F = TypeVar("F", bound=Callable[..., Any])

# OSErrors that are about the user's paths, with what to do about them
PATH_ERRNOS = {
    errno.ENOENT: "", errno.ENOTDIR: "", errno.EISDIR: "", errno.ENAMETOOLONG: "",
    errno.EACCES: "; check its permissions or choose another location",
    errno.EPERM: "; check its permissions or choose another location",
    errno.EROFS: "; choose an output location on a writable file system",
    errno.ENOSPC: "; free some space or choose another output location",
    errno.EDQUOT: "; free some space or choose another output location",
}


class UsageError(UserError):
    """Arguments argparse refused (missing, unknown choice, wrong type)."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose usage errors are one ``error:`` line (via ``user_errors``) instead of the usage
    text plus a message; ``--help`` still prints the usage."""

    def error(self, message: str):
        raise UsageError(f"{message} (see {self.prog} --help)")


def non_negative_int(text: str) -> int:
    """An argparse type for seeds and counts: numpy and torch refuse negative seeds."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def unit_fraction(text: str) -> float:
    """An argparse type for a share in [0, 1] (a weight, not a retention: no % form)."""
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must lie in [0, 1], got {value}")
    return value


def error_line(e: BaseException) -> str | None:
    """The one line a user error prints, or None when ``e`` is not one."""
    if isinstance(e, UserError):
        msg = str(e)
    elif isinstance(e, FileNotFoundError) and e.errno is None:
        msg = str(e)  # raised with a sentence of our own
    elif isinstance(e, OSError) and e.errno in PATH_ERRNOS:
        where = " -> ".join(repr(str(f)) for f in (e.filename, e.filename2) if f is not None)
        msg = f"{(e.strerror or type(e).__name__).lower()}{': ' + where if where else ''}{PATH_ERRNOS[e.errno]}"
    else:
        return None
    return "error: " + " ".join(msg.split())


def user_errors(main: F) -> F:
    """Decorate a CLI's ``main``: a user error prints its one line to stderr and ``main`` returns 2."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except (UserError, OSError) as e:
            line = error_line(e)
            if line is None:
                raise
            print(line, file=sys.stderr)
            return 2

    return wrapper  # type: ignore[return-value]


@user_errors
def config_main(doc: str, config_cls: type, default_config: str, run: Callable[[Any], dict],
                argv: list[str] | None = None) -> int:
    """``--config FILE --key=value ...`` -> ``run(config)``; prints the run's summary as JSON."""
    ap = ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter,
                        epilog="Any config key can be overridden: --bs=32 --model.depth=8")
    ap.add_argument("--config", default=default_config)
    args, overrides = ap.parse_known_args(argv)
    summary = run(load_config(config_cls, args.config, overrides))
    print(json.dumps(summary, indent=2))
    return 0
