"""The image recipes read as files: both definition files, the Containerfile, install.sh, the pins.

No Apptainer here (CLUSTER.md), so the definition files are parsed the way Apptainer reads them:
a header of `Key: value` lines, `%section` bodies, and `{{ NAME }}` placeholders filled from
containers/versions.env (its --build-arg-file). The exact `apptainer build` and `apptainer exec`
command lines are pinned for both flavors.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from orchestrator.errors import UsageError
from orchestrator.images import (
    GIT_COMMIT_VAR,
    GIT_DIRTY_VAR,
    GPU_FLAGS,
    PINS_FILE,
    JobImage,
    SourceRevision,
    apptainer_build_argv,
    apptainer_exec_argv,
    definition_files,
    definition_hash,
    definition_sources,
    read_pins,
    source_root,
    version_query_argv,
)

ROOT = Path(__file__).resolve().parents[1]
PLACEHOLDER = re.compile(r"{{\s*(\w+)\s*}}")
#: A version literal: two or more dot-separated numbers (2.7.1, 12.8, 3.12).
VERSION_LITERAL = re.compile(r"(?<![\w.])\d+\.\d+")
#: The official images, with the torch release their tag names.
OFFICIAL = {
    "cuda": re.compile(r"^pytorch/pytorch:(?P<torch>\d+\.\d+\.\d+)-cuda\d+\.\d+-cudnn9-runtime$"),
    "rocm": re.compile(r"^rocm/pytorch:rocm\d+(\.\d+)*_ubuntu\d+\.\d+_py3\.\d+_pytorch_release_"
                       r"(?P<torch>\d+\.\d+\.\d+)$"),
}


def parse_definition(text: str) -> tuple[dict[str, str], dict[str, str]]:
    """Header keywords and section bodies of an Apptainer definition file."""
    header: dict[str, str] = {}
    sections: dict[str, str] = {}
    current: str | None = None
    for line in text.splitlines():
        section = re.match(r"^%(\w+)\s*$", line)
        if section:
            current = section.group(1)
            assert current not in sections, f"section %{current} appears twice"
            sections[current] = ""
        elif current is None:
            if line.strip() and not line.lstrip().startswith("#"):
                key, sep, value = line.partition(":")
                assert sep, f"header line {line!r} is not `Key: value`"
                header[key.strip()] = value.strip()
        else:
            sections[current] += line + "\n"
    return header, sections


def code_lines(path: Path) -> list[str]:
    """Lines that are not comments (and, in a definition file, not %help text)."""
    lines, in_help = [], False
    for line in path.read_text().splitlines():
        if re.match(r"^%\w+", line):
            in_help = line.strip() == "%help"
        if in_help or line.lstrip().startswith("#"):
            continue
        lines.append(line)
    return lines


def arguments(text: str) -> dict[str, str]:
    """The %arguments section's defaults (NAME=value lines) of a definition file."""
    _header, sections = parse_definition(text)
    pairs = [line.strip().partition("=") for line in sections.get("arguments", "").splitlines()
             if line.strip()]
    return {name: value for name, _sep, value in pairs}


def resolve(text: str, pins: dict[str, str]) -> str:
    """Fill `{{ NAME }}` as apptainer --build-arg-file does, over the %arguments defaults; an
    unknown name is an error."""
    values = {**arguments(text), **pins}

    def fill(match: re.Match[str]) -> str:
        assert match.group(1) in values, f"{{{{ {match.group(1)} }}}} is not in {PINS_FILE}"
        return values[match.group(1)]

    return PLACEHOLDER.sub(fill, text)


@pytest.fixture(scope="module")
def pins() -> dict[str, str]:
    return read_pins(ROOT)


@pytest.mark.parametrize("flavor", ["cuda", "rocm"])
def test_definition_starts_from_the_official_pytorch_image(flavor: str,
                                                           pins: dict[str, str]) -> None:
    text = (ROOT / "containers" / f"{flavor}.def").read_text()
    header, sections = parse_definition(resolve(text, pins))
    assert list(header) == ["Bootstrap", "From"]
    assert header["Bootstrap"] == "docker"
    official = OFFICIAL[flavor].match(header["From"])
    assert official, f"{flavor}.def starts from {header['From']!r}, not an official image"
    # The torch release in the tag is the release install.sh requires of the base's torch.
    assert official.group("torch") == pins[f"{flavor.upper()}_TORCH_VERSION"]
    assert {"help", "labels", "files", "post", "environment", "runscript", "test"} <= set(sections)
    assert f"org.satrl.flavor {flavor}" in sections["labels"]
    assert f"SATRL_IMAGE_FLAVOR={flavor}" in sections["environment"]
    assert "python3 -m agents.train" in sections["runscript"]


@pytest.mark.parametrize("flavor", ["cuda", "rocm"])
def test_definition_exports_the_source_revision_satrl_passes_as_build_arguments(
        flavor: str, pins: dict[str, str]) -> None:
    text = (ROOT / "containers" / f"{flavor}.def").read_text()
    # A plain `apptainer build` (no --build-arg) still resolves: both default to unknown.
    assert arguments(text) == {GIT_COMMIT_VAR: "unknown", GIT_DIRTY_VAR: "unknown"}
    revision = SourceRevision("ab" * 20, True).build_args()
    _header, sections = parse_definition(resolve(text, {**pins, **revision}))
    environment = [line.strip() for line in sections["environment"].splitlines()]
    assert f"export {GIT_COMMIT_VAR}={'ab' * 20}" in environment
    assert f"export {GIT_DIRTY_VAR}=true" in environment
    assert f"org.satrl.git_commit {'ab' * 20}" in sections["labels"]
    assert SourceRevision(None, None).build_args() == {GIT_COMMIT_VAR: "unknown",
                                                       GIT_DIRTY_VAR: "unknown"}
    # What `git status` looks at: every file the image is built from, and nothing else.
    assert definition_sources(ROOT, flavor) == (
        f"containers/{flavor}.def", "containers/install.sh", PINS_FILE, "pyproject.toml",
        "README.md", "agents", "orchestrator", "migrations")


@pytest.mark.parametrize("flavor", ["cuda", "rocm"])
def test_definition_copies_the_sources_and_runs_the_shared_install_script(flavor: str) -> None:
    _header, sections = parse_definition((ROOT / "containers" / f"{flavor}.def").read_text())
    copies = dict(line.split() for line in sections["files"].splitlines() if line.strip())
    # %files sources are relative to the build's working directory: the source checkout.
    for source, destination in copies.items():
        assert (ROOT / source).exists(), f"%files source {source} does not exist"
        assert destination.startswith("/opt/satrl/")
    assert copies["containers/install.sh"] == "/opt/satrl/containers/install.sh"
    assert copies[PINS_FILE] == "/opt/satrl/containers/versions.env"
    for package in ("pyproject.toml", "README.md", "agents", "orchestrator", "migrations"):
        assert copies[package] == f"/opt/satrl/src/{package}"
    post = [line.strip() for line in sections["post"].splitlines() if line.strip()
            and not line.strip().startswith("#")]
    assert post[-1] == f"sh /opt/satrl/containers/install.sh /opt/satrl/src {flavor}"
    # Nothing but install.sh installs anything: no pip, conda or apt of its own.
    assert not re.search(r"\b(pip|conda|apt-get|apt)\b", sections["post"])


def test_containerfile_installs_through_the_same_script_on_a_base_chosen_by_build_arg() -> None:
    lines = code_lines(ROOT / "Containerfile")
    instructions = [line for line in lines if line.strip()]
    assert instructions[0] == "ARG BASE" and instructions[1] == "FROM ${BASE}"
    runs = [line for line in instructions if line.startswith("RUN ")]
    assert runs == ['RUN sh /opt/satrl/containers/install.sh /opt/satrl/src "${FLAVOR}"']
    copied = " ".join(line for line in instructions if line.startswith("COPY "))
    for needed in ("containers/install.sh", "containers/versions.env", "pyproject.toml",
                   "README.md", "agents", "orchestrator", "migrations"):
        assert needed in copied


def test_every_version_pin_comes_from_versions_env(pins: dict[str, str]) -> None:
    assert set(pins) == {"CUDA_BASE_IMAGE", "CUDA_TORCH_VERSION", "ROCM_BASE_IMAGE",
                         "ROCM_TORCH_VERSION"}
    recipes = [ROOT / "containers" / "cuda.def", ROOT / "containers" / "rocm.def",
               ROOT / "containers" / "install.sh", ROOT / "Containerfile"]
    used: set[str] = set()
    defaults: set[str] = set()
    for path in recipes:
        code = "\n".join(code_lines(path))
        literal = VERSION_LITERAL.search(code)
        assert literal is None, f"{path.name} writes a version ({literal.group()}): put it in " \
                                f"{PINS_FILE}"
        for value in pins.values():
            assert value not in code, f"{path.name} repeats the pin {value}"
        used |= set(PLACEHOLDER.findall(code))
        used |= {name for name in pins if re.search(rf"\${{?{name}\b", code)}
        if path.suffix == ".def":
            defaults |= set(arguments(path.read_text()))
    # Every placeholder but the source revision (defaulted in %arguments) is a pin.
    assert defaults == {GIT_COMMIT_VAR, GIT_DIRTY_VAR}
    assert used - defaults == set(pins), f"pins nothing reads: {set(pins) - used}"
    # The pins file is plain KEY=VALUE lines: apptainer's --build-arg-file reads it, so does sh.
    for line in (ROOT / PINS_FILE).read_text().splitlines():
        assert re.fullmatch(r"[A-Z_]+=[^\s'\"$`]+", line), line


def test_install_script_pins_torch_to_the_base_images_exact_build() -> None:
    """Static half of the ROCm guarantee (no ROCm image can be built here; the behaviour is in
    tests/test_images_install.py): both pip calls use the constraint written from the torch
    distribution version read inside the base at build time, and the check after install
    compares the full version string (with its +rocm/+cu tag), HIP/CUDA build and location."""
    script = (ROOT / "containers" / "install.sh").read_text()
    assert "printf 'torch==%s\\n' \"$dist\" >\"$work/constraints.txt\"" in script
    pip_calls = re.findall(r'"\$python" -m pip install(?:[^\n]*\\\n)*[^\n]*', script)
    assert len(pip_calls) == 2
    assert all('--constraint "$work/constraints.txt"' in call for call in pip_calls)
    assert "--dry-run" in pip_calls[0] and "--report" in pip_calls[0]
    assert '[ "$before" = "$after" ]' in script
    for key in ('"version": str(torch.__version__)', '"hip": getattr(torch.version, "hip"',
                '"cuda": torch.version.cuda', '"file": torch.__file__'):
        assert key in script
    assert re.search(r"rocm\) expect_torch=\$ROCM_TORCH_VERSION", script)


@pytest.mark.parametrize("fakeroot", [False, True])
def test_apptainer_build_command_line_for_both_flavors(fakeroot: bool) -> None:
    extra = ["--fakeroot"] if fakeroot else []
    assert apptainer_build_argv("/img/satrl-cuda.sif", "cuda", fakeroot=fakeroot) == [
        "apptainer", "build", *extra, "--build-arg-file", "containers/versions.env",
        "/img/satrl-cuda.sif", "containers/cuda.def"]
    assert apptainer_build_argv(Path("/img/satrl-rocm.sif"), "rocm", fakeroot=fakeroot) == [
        "apptainer", "build", *extra, "--build-arg-file", "containers/versions.env",
        "/img/satrl-rocm.sif", "containers/rocm.def"]


def test_apptainer_exec_command_line_nv_for_cuda_rocm_for_rocm_never_both() -> None:
    binds = ["/scratch/u:/scratch/u", "/data:/data:ro"]
    argv = ["python3", "-m", "agents.train", "/scratch/u/main/Pong/CWCA/42"]
    assert apptainer_exec_argv(JobImage("/img/c.sif", "cuda", "ab" * 32), binds, argv) == [
        "apptainer", "exec", "--nv", "--bind", "/scratch/u:/scratch/u", "--bind",
        "/data:/data:ro", "/img/c.sif", "python3", "-m", "agents.train",
        "/scratch/u/main/Pong/CWCA/42"]
    assert apptainer_exec_argv(JobImage("/img/r.sif", "rocm"), [], ["python3", "-V"]) == [
        "apptainer", "exec", "--rocm", "/img/r.sif", "python3", "-V"]
    for flavor in GPU_FLAGS:
        command = apptainer_exec_argv(JobImage("/i.sif", flavor), binds, argv)
        assert sum(flag in command for flag in ("--nv", "--rocm")) == 1
        assert command.index(GPU_FLAGS[flavor]) < command.index("/i.sif")
    assert version_query_argv("/i.sif")[:5] == ["apptainer", "exec", "/i.sif", "python3", "-c"]


def test_apptainer_build_command_line_passes_the_source_revision_as_build_args() -> None:
    args = {GIT_COMMIT_VAR: "c0ffee", GIT_DIRTY_VAR: "false"}
    assert apptainer_build_argv("/img/x.sif", "rocm", build_args=args) == [
        "apptainer", "build", "--build-arg-file", "containers/versions.env",
        "--build-arg", "SATRL_GIT_COMMIT=c0ffee", "--build-arg", "SATRL_GIT_DIRTY=false",
        "/img/x.sif", "containers/rocm.def"]


def test_unknown_flavor_or_empty_bind_is_refused() -> None:
    with pytest.raises(UsageError, match="cuda, rocm"):
        apptainer_exec_argv(JobImage("/i.sif", "nvidia"), [], ["true"])
    with pytest.raises(UsageError, match="cuda, rocm"):
        apptainer_build_argv("/i.sif", "cpu")
    with pytest.raises(UsageError, match="empty bind"):
        apptainer_exec_argv(JobImage("/i.sif", "cuda"), [""], ["true"])


def test_definition_hash_covers_the_definition_install_script_and_pins(tmp_path: Path) -> None:
    copy = tmp_path / "src"
    for relative in {*definition_files("cuda"), *definition_files("rocm")}:
        (copy / relative).parent.mkdir(parents=True, exist_ok=True)
        (copy / relative).write_bytes((ROOT / relative).read_bytes())
    assert definition_hash(copy, "cuda") == definition_hash(ROOT, "cuda")
    assert definition_hash(ROOT, "cuda") != definition_hash(ROOT, "rocm")
    for relative in definition_files("cuda"):
        before = definition_hash(copy, "cuda")
        (copy / relative).write_bytes((copy / relative).read_bytes() + b"\n")
        assert definition_hash(copy, "cuda") != before, f"{relative} is not hashed"
    assert source_root(copy) == copy.resolve()
    with pytest.raises(UsageError, match="not a satrl source checkout"):
        source_root(tmp_path)


@pytest.mark.parametrize("flavor", ["cuda", "rocm"])
def test_each_images_torch_satisfies_the_pinned_dependencies(flavor: str,
                                                             pins: dict[str, str]) -> None:
    # install.sh keeps the base's torch: a pinned dependency that needs a newer one (as
    # stable-baselines3 2.9.2 needs torch >= 2.8) makes every build fail at its pip step.
    from importlib import metadata

    from packaging.requirements import Requirement

    torch_pin = pins[f"{flavor.upper()}_TORCH_VERSION"]
    project = [Requirement(r) for r in metadata.requires("satrl") or []]
    pinned = [r.name for r in project if str(r.specifier).startswith("==")]
    assert "stable-baselines3" in pinned
    needs = [("satrl", r) for r in project if r.name == "torch"]
    for name in pinned:
        needs += [(name, req) for text in metadata.requires(name) or []
                  if (req := Requirement(text)).name == "torch" and req.marker is None]
    assert needs, "no requirement on torch found"
    for name, requirement in needs:
        assert requirement.specifier.contains(torch_pin), (
            f"{flavor}: torch {torch_pin} of the base image does not satisfy {name}'s "
            f"{requirement}")
