"""The ``harmonia`` command (and ``python -m harmonia``): starts the application, or says which extra to
install when the application's packages are missing."""

from __future__ import annotations

import sys
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    try:
        from harmonia.app.cli import main as app_main
    except ImportError as exc:
        if "harmonia[" not in str(exc):
            raise
        print(f"harmonia: {exc}", file=sys.stderr)
        return 1
    return app_main(argv)


if __name__ == "__main__":
    sys.exit(main())
