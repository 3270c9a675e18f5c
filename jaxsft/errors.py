"""Exceptions a CLI turns into one line and an exit code: bad input (2), a run stopped on a signal after a
checkpoint (75), a run that cannot go on (1)."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable

EXIT_BAD_INPUT = 2
EXIT_FAILURE = 1
EXIT_STOPPED = 75  # EX_TEMPFAIL: stopped on a signal with a checkpoint written; rerun the same command to resume


class UserError(Exception):
    """Bad input (config, data, checkpoint folder, workdir): the message names the offending thing."""


class RunFailed(Exception):
    """A run that cannot go on (not bad input), e.g. a non-finite loss: one line, exit 1."""


class Stopped(Exception):
    """Training stopped at a step boundary on SIGTERM/SIGINT after writing a checkpoint: exit 75."""


def first_line(e: BaseException) -> str:
    """The first non-blank line of an exception's message, stripped ("" when it has none): what one-line errors
    quote of a library's exception."""
    return next((line.strip() for line in str(e).splitlines() if line.strip()), "")


def _flush_native_output() -> None:
    """Writes out what native libraries left in C stdio buffers (gloo's connection lines in a multi-host run), so
    the CLI's own closing line comes after it."""
    try:
        import ctypes

        ctypes.CDLL(None).fflush(None)
    except Exception:  # noqa: BLE001 - no C runtime to reach (not POSIX): nothing to flush
        pass


def _say(line: str) -> None:
    """The CLI's closing line on stderr, after anything native libraries still buffer."""
    _flush_native_output()
    print(line, file=sys.stderr, flush=True)


def run_cli(main: Callable[[list[str]], int | None], argv: list[str] | None = None) -> None:
    """Runs a CLI main; bad input → one line on stderr and exit 2, other failures → one line and exit 1."""
    argv = list(sys.argv[1:] if argv is None else argv)
    verbose = "--verbose" in argv
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr, force=True)
    for noisy in ("absl", "jax._src", "orbax", "datasets", "httpx", "urllib3", "filelock", "fsspec"):
        logging.getLogger(noisy).setLevel(logging.WARNING if verbose else logging.ERROR)
    try:
        code = main(argv)
    except UserError as e:
        if verbose:  # the traceback, then the same line and exit code as without --verbose
            import traceback

            traceback.print_exc()
        _say(f"error: {e}")
        sys.exit(EXIT_BAD_INPUT)
    except Stopped as e:
        _say(str(e))
        sys.exit(EXIT_STOPPED)
    except RunFailed as e:
        if verbose:
            raise
        _say(f"error: {e}")
        sys.exit(EXIT_FAILURE)
    except KeyboardInterrupt:
        _say("error: interrupted")
        sys.exit(130)
    except Exception as e:  # noqa: BLE001 - the CLI's last line must stay one readable line
        if verbose:
            raise
        _say(f"error: {type(e).__name__}: {first_line(e)} (rerun with --verbose for the traceback)")
        sys.exit(EXIT_FAILURE)
    sys.exit(code or 0)
