"""``python -m bondgate``: the ``bondgate`` command (for environments where the console script is not on PATH)."""

from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
