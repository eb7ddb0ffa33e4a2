"""Support code shared by the tests (``from support.catalog import job_config``): pytest puts ``tests/`` on
``sys.path`` (``pythonpath`` in pyproject.toml), and the root conftest adds it to ``PYTHONPATH`` so that Ray
workers and job subprocesses import the plug-in engines in ``support.engines`` too."""

from __future__ import annotations

import os
import pathlib
from typing import NoReturn

REPO = pathlib.Path(__file__).resolve().parents[2]
SHARED = REPO.parent / "shared"  # the shared data beside the repo: photos, video clips, KubeRay CRDs
CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
MISSING = "missing: "  # the skip reasons conftest.py turns into failures under CI=true


def missing(what: str) -> NoReturn:
    """Skip for want of ``what`` (../shared, chromium, the activated venv): fine in a newcomer's clone, a failure
    under CI=true (conftest.py)."""
    import pytest  # here, not at the top: Ray workers import support.engines, and this package with it

    __tracebackhide__ = True  # the skip is reported at the test's line
    pytest.skip(MISSING + what)
