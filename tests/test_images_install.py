"""containers/install.sh, run for real against a base python that holds a given torch build.

No CUDA or ROCm image can be built here, so the "base image" is a fresh venv holding a torch
distribution built by the test (a wheel with torch/__init__.py and torch/version.py carrying the
version string, CUDA and HIP fields the real builds have), and the project is a tiny one that
depends on torch>=2.3 with the agents.train / orchestrator.cli modules install.sh imports at the
end. pip runs with this machine's configuration, as it would inside a build.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from orchestrator.images import read_pins

ROOT = Path(__file__).resolve().parents[1]
INSTALL = ROOT / "containers" / "install.sh"
PROBE = "satrl-install-probe"
FINGERPRINT = ("import json, torch\nfrom importlib import metadata\n"
               "try:\n    dist = metadata.version('torch')\n"
               "except metadata.PackageNotFoundError:\n    dist = None\n"
               "print(json.dumps([str(torch.__version__), dist, torch.version.cuda, "
               "torch.version.hip, torch.__file__]))")


def torch_wheel(folder: Path, version: str, cuda: str | None, hip: str | None) -> Path:
    """A wheel of a `torch` whose version, CUDA and HIP fields are those given."""
    folder.mkdir(parents=True, exist_ok=True)
    wheel = folder / f"torch-{version}-py3-none-any.whl"
    info = f"torch-{version}.dist-info"
    files = {
        "torch/__init__.py": f"__version__ = {version!r}\nfrom torch import version\n",
        "torch/version.py": f"__version__ = {version!r}\ncuda = {cuda!r}\nhip = {hip!r}\n",
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: torch\nVersion: {version}\n",
        f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: satrl-tests\nRoot-Is-Purelib: true\n"
                         "Tag: py3-none-any\n",
    }
    with zipfile.ZipFile(wheel, "w") as archive:
        for name, text in files.items():
            archive.writestr(name, text)
        record = "".join(f"{name},,\n" for name in files) + f"{info}/RECORD,,\n"
        archive.writestr(f"{info}/RECORD", record)
    return wheel


def make_probe(folder: Path) -> Path:
    """A project laid out like satrl's for install.sh: pyproject.toml, agents/, orchestrator/."""
    (folder / "agents").mkdir(parents=True)
    (folder / "orchestrator").mkdir()
    for module in ("agents/__init__.py", "agents/train.py", "orchestrator/__init__.py",
                   "orchestrator/cli.py"):
        (folder / module).write_text("")
    (folder / "pyproject.toml").write_text(
        '[build-system]\nrequires = ["setuptools>=61"]\nbuild-backend = "setuptools.build_meta"\n'
        f'[project]\nname = "{PROBE}"\nversion = "0.0.1"\ndependencies = ["torch>=2.3"]\n'
        '[tool.setuptools]\npackages = ["agents", "orchestrator"]\n')
    return folder


class Base:
    """A venv standing in for a base image's python."""

    def __init__(self, folder: Path) -> None:
        subprocess.run([sys.executable, "-m", "venv", str(folder)], check=True)
        self.python = folder / "bin" / "python"
        self.folder = folder

    def pip(self, *args: str) -> None:
        result = subprocess.run([str(self.python), "-m", "pip", "-q", *args],
                                capture_output=True, text=True,
                                env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"})
        assert result.returncode == 0, result.stderr[-2000:]

    def put_torch(self, wheels: Path, version: str, cuda: str | None, hip: str | None,
                  *, with_metadata: bool = True) -> list[object]:
        self.pip("uninstall", "-y", "torch")
        wheel = torch_wheel(wheels, version, cuda, hip)
        self.pip("install", "--no-index", "--no-deps", str(wheel))
        if not with_metadata:  # importable, but no distribution pip can see
            site = Path(self.torch()[4]).parent.parent
            for info in site.glob("torch-*.dist-info"):
                for item in info.iterdir():
                    item.unlink()
                info.rmdir()
        return self.torch()

    def torch(self) -> list[object]:
        out = subprocess.run([str(self.python), "-c", FINGERPRINT], capture_output=True,
                             text=True, check=True).stdout
        return json.loads(out)

    def has_probe(self) -> bool:
        return subprocess.run([str(self.python), "-m", "pip", "show", "-q", PROBE],
                              capture_output=True).returncode == 0

    def install(self, source: Path, flavor: str, cwd: Path,
                **env: str) -> subprocess.CompletedProcess[str]:
        # cwd away from the repository: `python -c "import agents.train"` must not find ours.
        return subprocess.run(["sh", str(INSTALL), str(source), flavor], cwd=cwd,
                              capture_output=True, text=True, timeout=600,
                              env={**os.environ, "SATRL_PYTHON": str(self.python), **env})


@pytest.fixture(scope="module")
def refusing_base(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Base, Path]]:
    """One base for the refusal cases (none of them may install anything into it)."""
    folder = tmp_path_factory.mktemp("refusals")
    base = Base(folder / "venv")
    yield base, make_probe(folder / "probe")
    assert not base.has_probe(), "a refused install installed the project"


def test_install_keeps_the_base_rocm_torch_and_installs_the_project(tmp_path: Path) -> None:
    pin = read_pins(ROOT)["ROCM_TORCH_VERSION"]
    base = Base(tmp_path / "venv")
    before = base.put_torch(tmp_path / "wheels", f"{pin}+rocm6.4.1", None, "6.4.43482")
    result = base.install(make_probe(tmp_path / "probe"), "rocm", tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert base.torch() == before
    assert before[0] == f"{pin}+rocm6.4.1" and before[3] == "6.4.43482"
    assert base.has_probe()
    assert f'"version": "{pin}+rocm6.4.1"' in result.stdout.splitlines()[-1]


@pytest.mark.parametrize(("flavor", "version", "cuda", "hip", "metadata", "message"), [
    ("cuda", "{CUDA}+rocm6.4.1", None, "6.4", True, "is not a CUDA build"),
    ("rocm", "{ROCM}+cu128", "12.8", None, True, "is not a ROCm (HIP) build"),
    ("rocm", "2.0.1+rocm5.7", None, "5.7", True, "but versions.env pins"),
    ("any", "2.5.0+cu124", "12.4", None, False, "no installed distribution pip can see"),
])
def test_install_refuses_a_base_torch_that_does_not_fit(
    refusing_base: tuple[Base, Path], tmp_path: Path, flavor: str, version: str,
    cuda: str | None, hip: str | None, metadata: bool, message: str,
) -> None:
    base, probe = refusing_base
    pins = read_pins(ROOT)
    version = version.format(CUDA=pins["CUDA_TORCH_VERSION"], ROCM=pins["ROCM_TORCH_VERSION"])
    before = base.put_torch(tmp_path, version, cuda, hip, with_metadata=metadata)
    result = base.install(probe, flavor, tmp_path)
    assert result.returncode == 1
    assert message in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("install.sh: ")
    assert base.torch() == before


def test_install_refuses_a_project_that_needs_another_torch(
    refusing_base: tuple[Base, Path], tmp_path: Path,
) -> None:
    base, probe = refusing_base
    before = base.put_torch(tmp_path, "2.1.0+cpu", None, None)  # the probe needs torch>=2.3
    result = base.install(probe, "any", tmp_path)
    assert result.returncode == 1
    assert "while keeping torch==2.1.0+cpu" in result.stderr
    assert base.torch() == before


def test_install_refuses_a_pip_plan_that_would_replace_torch(
    refusing_base: tuple[Base, Path], tmp_path: Path,
) -> None:
    """pip settings from the environment (here PIP_FORCE_REINSTALL) must not get past the plan
    check: the dry run plans a torch install, so nothing is installed."""
    base, probe = refusing_base
    before = base.put_torch(tmp_path / "wheels", "2.6.0+cu124", "12.4", None)
    result = base.install(probe, "any", tmp_path, PIP_FORCE_REINSTALL="1",
                          PIP_FIND_LINKS=str(tmp_path / "wheels"))
    assert result.returncode == 1, result.stdout[-2000:]
    assert "pip would install torch 2.6.0+cu124 over the base image's torch" in result.stderr
    assert base.torch() == before


def test_install_usage_errors_are_one_line() -> None:
    result = subprocess.run(["sh", str(INSTALL)], capture_output=True, text=True)
    assert result.returncode == 1
    assert result.stderr == "install.sh: usage: install.sh SRC_DIR [cuda|rocm|any]\n"
    result = subprocess.run(["sh", str(INSTALL), str(ROOT), "cpu"], capture_output=True,
                            text=True)
    assert result.returncode == 1
    assert result.stderr == "install.sh: flavor must be cuda, rocm or any, not 'cpu'\n"
