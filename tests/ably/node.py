"""Where the tests find node and ably-js (tests/js, installed with ``npm ci``), and why they skip without them."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

JS_DIR = Path(__file__).resolve().parents[1] / "js"
NODE = shutil.which("node")


def skip_without_ably_js() -> None:
    """Skip the calling test module when node or ably-js is missing (pytest -ra, the default here, says why)."""
    if NODE is None:
        pytest.skip("node is not installed", allow_module_level=True)
    if not (JS_DIR / "node_modules" / "ably").is_dir():
        pytest.skip(f"ably-js is not installed: run `npm ci` in {JS_DIR}", allow_module_level=True)
