"""``python -m entities.cli``: the same as the ``entities`` console script."""

from __future__ import annotations

from ._main import main

if __name__ == "__main__":
    main()
