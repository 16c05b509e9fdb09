"""The documents stay true to the code: the config reference is generated from the schema, and
the README stays a user's page."""

from __future__ import annotations

import subprocess
import sys

from .conftest import ROOT


def test_the_config_reference_is_up_to_date() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "docs" / "make_config_reference.py"), "--check"],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_readme_is_short_and_points_only_inside_the_repository() -> None:
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 200
    assert "../" not in text and "DESIGN.md" not in text
    for document in ("docs/configuration.md", "docs/architecture.md", "docs/operations.md"):
        assert document in text and (ROOT / document).exists()
