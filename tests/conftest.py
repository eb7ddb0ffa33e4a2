import os

# Nothing in the test suite may reach a model hub or need Ray's token auth.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pathlib

import pytest

TESTS = pathlib.Path(__file__).parent
GOLDEN = TESTS / "data" / "golden"
SHARED = TESTS.parent.parent / "shared"


@pytest.fixture(scope="session")
def golden_dir() -> pathlib.Path:
    return GOLDEN
