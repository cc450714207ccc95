"""``uv run python -m benchmarks [--quick] [--only NAME] ...``: run the benchmarks, print a markdown table."""

from __future__ import annotations

from ._cli import main

if __name__ == "__main__":
    raise SystemExit(main())
