"""The top-level Containerfile, built for real with podman on a small local base (CLUSTER.md).

The base (Debian bookworm from debootstrap, plus this machine's CPU torch wheel in a venv on PATH,
as an official PyTorch image holds its torch) is made by tests/fixtures/podman_base.py once per
machine. The worker image is then built from the working tree through containers/install.sh, with
the project's other dependencies resolved by pip under this machine's pip configuration, and
`python -m agents.train --help` must run inside it with torch exactly as the base had it.
Slow (a minute or two, more when the base is made): marked slow, and run on CI.
"""

from __future__ import annotations

import json
import tempfile
import time
import uuid
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path

import pytest

from tests.fixtures.podman_base import (
    RUN_LIMITS,
    ensure_base_image,
    ensure_torch_base,
    host_pip_setup,
    podman,
    require_podman,
)

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
TORCH_QUERY = ("import json, torch\nfrom importlib import metadata\n"
               "print(json.dumps({'version': str(torch.__version__), "
               "'dist': metadata.version('torch'), 'cuda': torch.version.cuda, "
               "'file': torch.__file__}))")
#: Seconds each step took in this session, printed at the end (`pytest -s` shows them).
TIMINGS: dict[str, float] = {}


@pytest.fixture(scope="module")
def torch_base() -> str:
    """The local base with this machine's torch (made once per machine, then reused)."""
    require_podman()
    started = time.monotonic()
    ensure_base_image(TIMINGS)
    tag = ensure_torch_base(metadata.version("torch"), host_pip_setup(), TIMINGS)
    TIMINGS["bases_ready_s"] = time.monotonic() - started
    return tag


@pytest.fixture(scope="module")
def worker_image(torch_base: str) -> Iterator[str]:
    """The Containerfile built from this working tree on the torch base; removed afterwards."""
    tag = f"localhost/satrl-worker:test-{uuid.uuid4().hex[:8]}"
    setup = host_pip_setup()
    with tempfile.TemporaryDirectory(prefix="satrl-pipconf-") as folder:
        conf = Path(folder) / "pip.conf"
        conf.write_text(setup.conf)
        started = time.monotonic()
        # --layers=false: the install is really run each time, and `rmi` leaves no layers.
        podman("build", "--pull=never", "--network=host", "--layers=false",
               "--build-arg", f"BASE={torch_base}",
               *setup.volume_args(conf), "-t", tag, "-f", str(ROOT / "Containerfile"),
               str(ROOT), timeout_s=1200)
        TIMINGS["worker_build_s"] = time.monotonic() - started
    try:
        yield tag
    finally:
        podman("rmi", "-f", tag)
        print(f"\npodman timings (s): {json.dumps({k: round(v, 1) for k, v in TIMINGS.items()})}")


def _run(image: str, label: str, *argv: str) -> str:
    started = time.monotonic()
    out = podman("run", "--rm", *RUN_LIMITS, image, *argv).stdout
    TIMINGS[f"run_{label}_s"] = time.monotonic() - started
    return out


def test_worker_runs_inside_the_containerfile_image(worker_image: str) -> None:
    out = _run(worker_image, "help", "python", "-m", "agents.train", "--help")
    assert out.startswith("usage: python -m agents.train [-h] RUN_DIR")
    assert "exit.json" in out
    # The CMD is the same worker, and satrl itself was installed (not just copied).
    installed = _run(worker_image, "import", "python", "-c",
                     "from importlib import metadata; import agents.train, orchestrator.cli; "
                     "print(metadata.version('satrl'))")
    assert installed.strip() == metadata.version("satrl")


def test_project_install_leaves_the_base_images_torch_unchanged(torch_base: str,
                                                                worker_image: str) -> None:
    base = json.loads(_run(torch_base, "base_torch", "python", "-c", TORCH_QUERY))
    worker = json.loads(_run(worker_image, "worker_torch", "python", "-c", TORCH_QUERY))
    assert worker == base
    # It is this machine's CPU wheel, local tag included; no CUDA build was pulled in.
    assert worker["version"] == metadata.version("torch") == worker["dist"]
    assert worker["cuda"] is None
