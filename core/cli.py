"""How every `mugs-*` command ends: the one place an error becomes a line and an exit code."""

from __future__ import annotations

import sys
from collections.abc import Callable

from .errors import EXIT_INTERRUPTED, EXIT_OK, MugsError


def run_cli(main: Callable[[], int | None], prog: str) -> int:
    """`main()`'s exit code (None: 0). A `MugsError` (core/errors.py) becomes `prog: error: <message>`,
    one line on stderr, and its `exit_code`; Ctrl-C exits 130 without a traceback; anything else is a
    bug and propagates (a traceback, exit 1)."""
    try:
        code = main()
    except MugsError as e:
        message = " ".join(str(e).split("\n"))
        print(f"{prog}: error: {message}", file=sys.stderr, flush=True)
        return e.exit_code
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED
    return EXIT_OK if code is None else code
