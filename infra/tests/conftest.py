import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from infra_model import INFRA  # noqa: E402


@pytest.fixture
def infra_copy(tmp_path: Path) -> Path:
    """A scratch copy of infra/ (without the tests) for mutation tests."""
    dest = tmp_path / "infra"
    shutil.copytree(INFRA, dest, ignore=shutil.ignore_patterns("tests", "__pycache__"))
    return dest


def replace_once(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert text.count(old) == 1, f"{old!r} occurs {text.count(old)} times in {path}"
    path.write_text(text.replace(old, new))
