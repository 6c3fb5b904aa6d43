"""Third-party binaries used by interop tests: required in CI, skipped locally if absent."""

from __future__ import annotations

import os
import shutil

import pytest


def require_binary(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        if os.environ.get("CI"):
            pytest.fail(f"{name} is required in CI (scripts/test installs it)")
        pytest.skip(f"{name} not installed (apt-get install libcoap3-bin / mosquitto)")
    return path
