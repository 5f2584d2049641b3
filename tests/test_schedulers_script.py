"""The job script every backend renders: placeholders filled once, values kept literally."""

from __future__ import annotations

import re
import shlex
import subprocess
from pathlib import Path

from orchestrator.resources import Resources
from orchestrator.schedulers.base import Batch, BatchMember
from orchestrator.schedulers.slurm import SlurmScheduler


def test_job_script_keeps_a_placeholder_inside_a_value_literally(tmp_path: Path) -> None:
    # A run directory whose name holds placeholders must not have them expanded.
    run_dir = tmp_path / "exp@LAUNCH@" / "Pong@TOKEN@" / "NA" / "0"
    batch = Batch("satrl-0123456789", (BatchMember(1, run_dir),), Resources(),
                  tmp_path / "batch", ("python3", "-m", "agents.train"))
    script = SlurmScheduler().render_script(batch)
    assert shlex.quote(str(run_dir)) in script
    assert script.count("agents.train") == 1
    assert re.search(r"@[A-Z_]+@", script.replace(str(run_dir), "")) is None
    assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0
