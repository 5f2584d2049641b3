"""Broken configuration and unreachable registries: one line, non-zero exit, no traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest


def _satrl(workspace: Path, *args: str, env: dict[str, str] | None = None
           ) -> subprocess.CompletedProcess[str]:
    import os

    environment = {k: v for k, v in os.environ.items()
                   if not k.startswith("SATRL_")} | {"SATRL_HOME": str(workspace)} | (env or {})
    return subprocess.run([sys.executable, "-m", "orchestrator", *args], capture_output=True,
                          text=True, env=environment, timeout=120)


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ('registry = "x"\n', "[registry] must be a table"),
        ("[registry]\nurl = 5\n", "url must be a string"),
        ('paths = ["a"]\n', "[paths] must be a table"),
        ("experiment = 3\n", "experiment must be a string"),
        ("[registry\n", "not valid TOML"),
    ],
)
def test_broken_satrl_toml_is_one_line(tmp_path: Path, toml: str, message: str) -> None:
    (tmp_path / "satrl.toml").write_text(toml)
    result = _satrl(tmp_path, "status")
    assert result.returncode == 2
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("postgresql://postgres@127.0.0.1:1/nothing", "cannot use the registry at"),
        ("sqlite:////proc/no-such-folder/satrl.db", "cannot create the registry's folder"),
    ],
)
def test_unreachable_registry_is_one_line(tmp_path: Path, url: str, message: str) -> None:
    result = _satrl(tmp_path, "status", env={"SATRL_DATABASE_URL": url})
    assert result.returncode == 1
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert "Traceback" not in result.stderr
