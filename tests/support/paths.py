"""Where the tests' data and the repository are, wherever a test module sits under tests/."""

from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]
DATA = TESTS / "data"
REPO = TESTS.parent
