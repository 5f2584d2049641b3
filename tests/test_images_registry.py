"""`satrl image build|list|use` end to end, with a stand-in `apptainer` on PATH, on both databases.

Apptainer cannot be installed here (CLUSTER.md). The stand-in is a small script this module writes:
it records every argument list it gets, fills the definition file's `{{ NAME }}` placeholders
from the --build-arg-file as Apptainer does (refusing unknown names), checks the %files sources
exist relative to its working directory, and writes the output file; `exec IMAGE python3 -c CODE`
runs CODE with this machine's python, so the version query satrl sends is really executed and
what gets recorded is this machine's torch.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from importlib import metadata
from pathlib import Path

import pytest
from sqlalchemy import select

from orchestrator.cli import run
from orchestrator.images import (
    JobImage,
    apptainer_build_argv,
    definition_hash,
    resolve_job_image,
    version_query_argv,
)
from orchestrator.registry.db import Registry
from orchestrator.registry.models import Experiment, Image
from orchestrator.settings import load_settings

ROOT = Path(__file__).resolve().parents[1]

STANDIN = r'''#!{python}
"""Stand-in for apptainer: records its arguments, writes images, answers exec."""
import json, os, re, subprocess, sys
from pathlib import Path

args = sys.argv[1:]
with open(os.environ["STANDIN_APPTAINER_LOG"], "a") as log:
    log.write(json.dumps({{"argv": [os.path.basename(sys.argv[0]), *args],
                          "cwd": os.getcwd()}}) + "\n")
if os.environ.get("STANDIN_APPTAINER_FAIL") == args[0]:
    print("INFO:    Starting build...")
    print("FATAL:   While performing build: stand-in failure", file=sys.stderr)
    sys.exit(255)
if args[0] == "build":
    pins = {{}}
    if "--build-arg-file" in args:
        for line in Path(args[args.index("--build-arg-file") + 1]).read_text().splitlines():
            key, _, value = line.partition("=")
            pins[key.strip()] = value.strip()
    out, definition = args[-2], args[-1]

    def fill(match):
        if match.group(1) not in pins:
            sys.exit(f"FATAL: build var {{match.group(1)}} is not defined")
        return pins[match.group(1)]

    resolved = re.sub(r"{{{{\s*(\w+)\s*}}}}", fill, Path(definition).read_text())
    files = re.search(r"^%files\s*$(.*?)^%", resolved, re.M | re.S).group(1)
    for line in files.strip().splitlines():
        if not Path(line.split()[0]).exists():
            sys.exit(f"FATAL: %files source {{line.split()[0]}} not found")
    print("INFO:    Creating SIF file...")
    Path(out).write_text("STAND-IN SIF\n" + os.environ.get("STANDIN_APPTAINER_SALT", "")
                         + resolved)
elif args[0] == "exec":
    at = 1
    while args[at].startswith("-"):
        at += 2 if args[at] == "--bind" else 1
    image, command = args[at], args[at + 1:]
    if not Path(image).read_text().startswith("STAND-IN SIF"):
        sys.exit(f"FATAL: {{image}} is not an image")
    if command[0] == "python3":
        command = [sys.executable, *command[1:]]
    sys.exit(subprocess.run(command).returncode)
else:
    sys.exit(f"stand-in apptainer: {{args[0]}} is not supported")
'''


class StandIn:
    def __init__(self, folder: Path) -> None:
        self.bin = folder / "bin"
        self.bin.mkdir(parents=True)
        self.log = folder / "apptainer-calls.jsonl"
        script = self.bin / "apptainer"
        script.write_text(STANDIN.format(python=sys.executable))
        script.chmod(0o755)

    def calls(self) -> list[dict[str, object]]:
        if not self.log.exists():
            return []
        return [json.loads(line) for line in self.log.read_text().splitlines()]


@pytest.fixture
def standin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> StandIn:
    fake = StandIn(tmp_path / "standin")
    monkeypatch.setenv("PATH", f"{fake.bin}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("STANDIN_APPTAINER_LOG", str(fake.log))
    return fake


def _images(database_url: str) -> list[Image]:
    registry = Registry(database_url)
    try:
        with registry.session() as session:
            rows = list(session.scalars(select(Image).order_by(Image.id)))
            session.expunge_all()
            return rows
    finally:
        registry.dispose()


def _experiment_image(database_url: str, name: str) -> int | None:
    registry = Registry(database_url)
    try:
        with registry.session() as session:
            return session.scalar(select(Experiment.image_id).where(Experiment.name == name))
    finally:
        registry.dispose()


def _add_experiments(database_url: str, *names: str) -> None:
    registry = Registry(database_url)
    try:
        with registry.write() as session:
            for name in names:
                session.add(Experiment(name=name, preset="smoke"))
    finally:
        registry.dispose()


def _json(capsys: pytest.CaptureFixture[str], *args: str) -> object:
    capsys.readouterr()
    assert run([*args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_image_build_with_stand_in_apptainer_records_the_image_end_to_end(
    workspace: Path, database_url: str, standin: StandIn, capsys: pytest.CaptureFixture[str],
) -> None:
    out = workspace / "images" / "cuda.sif"
    assert run(["image", "build", "--flavor", "cuda", "--fakeroot", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "recorded new image 1 (cuda, torch" in printed

    build, query = standin.calls()
    partial = Path(build["argv"][-2])
    assert partial.parent == out.parent and partial.name.startswith(".cuda.sif.")
    assert partial.name.endswith(".partial") and not partial.exists()
    assert build == {"argv": apptainer_build_argv(partial, "cuda", fakeroot=True),
                     "cwd": str(ROOT)}
    assert query["argv"] == version_query_argv(partial)

    data = out.read_bytes()
    assert data.startswith(b"STAND-IN SIF\n")
    assert b"From: pytorch/pytorch:" in data  # the pins reached the definition file
    (image,) = _images(database_url)
    assert image.flavor == "cuda"
    assert image.path == str(out.resolve())
    assert image.size_bytes == len(data)
    assert image.sha256 == hashlib.sha256(data).hexdigest()
    assert image.definition_hash == definition_hash(ROOT, "cuda")
    # What the image's python reported: here the stand-in ran the query with this machine's.
    assert image.torch_version == metadata.version("torch")
    assert image.cuda_version is None and image.rocm_version is None
    assert image.versions["stable-baselines3"] == metadata.version("stable-baselines3")
    assert image.versions["python"] == ".".join(map(str, sys.version_info[:3]))
    assert image.build_seconds is not None and image.build_seconds >= 0
    assert image.built_at is not None
    assert (out.parent / "cuda.sif.build.log").read_text().startswith(f"$ cd {ROOT} && ")

    (listed,) = _json(capsys, "image", "list")
    assert listed["id"] == image.id and listed["status"] == "current"
    assert listed["sha256"] == image.sha256 and listed["experiments"] == []
    assert run(["image", "list"]) == 0
    assert image.sha256[:12] in capsys.readouterr().out


def test_default_image_path_is_under_the_workspace_named_by_definition_hash(
    workspace: Path, database_url: str, standin: StandIn, capsys: pytest.CaptureFixture[str],
) -> None:
    result = _json(capsys, "image", "build", "--flavor", "rocm")
    expected = workspace / "images" / f"satrl-rocm-{definition_hash(ROOT, 'rocm')[:12]}.sif"
    assert result["path"] == str(expected.resolve()) and expected.is_file()
    assert b"From: rocm/pytorch:" in expected.read_bytes()
    build, _query = standin.calls()
    assert build["argv"] == apptainer_build_argv(build["argv"][-2], "rocm")  # no --fakeroot


def test_rebuilds_same_bytes_update_new_bytes_add_a_row_and_move_experiments_stand_in_apptainer(
    workspace: Path, database_url: str, standin: StandIn, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    out = workspace / "images" / "cuda.sif"
    args = ["image", "build", "--flavor", "cuda", "--out", str(out)]
    first = _json(capsys, *args)
    _add_experiments(database_url, "main", "other")
    assert run(["image", "use", str(first["image_id"])]) == 0

    again = _json(capsys, *args)  # identical bytes: the same row, updated
    assert again["image_id"] == first["image_id"] and again["created"] is False
    assert len(_images(database_url)) == 1

    monkeypatch.setenv("STANDIN_APPTAINER_SALT", "another build\n")
    new = _json(capsys, *args)  # new bytes at the same path: a new row; main follows the file
    assert new["created"] is True and new["image_id"] != first["image_id"]
    assert new["replaced"] == [first["image_id"]] and new["relinked"] == ["main"]
    assert _experiment_image(database_url, "main") == new["image_id"]
    assert _experiment_image(database_url, "other") is None
    statuses = {row["id"]: row["status"] for row in _json(capsys, "image", "list")}
    assert statuses == {first["image_id"]: "replaced", new["image_id"]: "current"}

    # The older row's file is gone from its path: choosing it is refused, nothing changes.
    capsys.readouterr()
    assert run(["image", "use", str(first["image_id"]), "-e", "other"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and f"replaced at {out.resolve()} by image" in err
    assert _experiment_image(database_url, "other") is None


def test_image_use_sets_the_experiment_image_its_jobs_run_in(
    workspace: Path, database_url: str, standin: StandIn, capsys: pytest.CaptureFixture[str],
) -> None:
    built = _json(capsys, "image", "build", "--flavor", "rocm", "--out",
                  str(workspace / "r.sif"))
    _add_experiments(database_url, "main", "short")
    used = _json(capsys, "image", "use", built["sha256"][:10], "--experiment", "short")
    assert used["image_id"] == built["image_id"] and used["experiment"] == "short"
    assert _experiment_image(database_url, "short") == built["image_id"]
    assert _experiment_image(database_url, "main") is None

    registry = Registry(database_url)
    try:
        with registry.session() as session:
            short = session.scalar(select(Experiment).where(Experiment.name == "short"))
            job_image = resolve_job_image(session, load_settings(workspace), short)
    finally:
        registry.dispose()
    assert job_image == JobImage(built["path"], "rocm", built["sha256"])
    (listed,) = _json(capsys, "image", "list", "--flavor", "rocm")
    assert listed["experiments"] == ["short"]
    assert _json(capsys, "image", "list", "--flavor", "cuda") == []

    assert run(["image", "use", "none", "-e", "short"]) == 0
    assert _experiment_image(database_url, "short") is None

    for ref, experiment, message in [("99", "main", "no image with id 99"),
                                     ("xyz", "main", "image id or a sha256 prefix"),
                                     (str(built["image_id"]), "mian", "no experiment 'mian'")]:
        capsys.readouterr()
        assert run(["image", "use", ref, "-e", experiment]) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and message in err
    assert _experiment_image(database_url, "main") is None


def test_failed_build_with_stand_in_apptainer_records_nothing(
    workspace: Path, database_url: str, standin: StandIn, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    out = workspace / "images" / "cuda.sif"
    monkeypatch.setenv("STANDIN_APPTAINER_FAIL", "build")
    assert run(["image", "build", "--flavor", "cuda", "--out", str(out), "-q"]) == 1
    err = capsys.readouterr().err
    assert "apptainer build exited 255" in err and "; command: apptainer build " in err
    assert "stand-in failure" in err and "cuda.sif.build.log" in err
    assert _images(database_url) == []
    assert sorted(p.name for p in out.parent.iterdir()) == ["cuda.sif.build.log"]

    monkeypatch.setenv("STANDIN_APPTAINER_FAIL", "exec")  # built, but its python cannot answer
    assert run(["image", "build", "--flavor", "cuda", "--out", str(out), "-q"]) == 1
    assert "reading versions from" in capsys.readouterr().err
    assert _images(database_url) == []
    assert not out.exists()


def test_image_build_without_apptainer_says_so_in_one_line(
    workspace: Path, database_url: str, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
) -> None:
    empty = tmp_path / "empty-path"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    assert run(["image", "build", "--flavor", "cuda", "--out", str(workspace / "x.sif")]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("satrl: apptainer is not installed")
    assert captured.err.count("\n") == 1
    assert not (workspace / "x.sif").exists()
    assert _images(database_url) == []
    assert run(["image", "build", "--flavor", "gpu"]) == 2
    assert "image flavor must be one of cuda, rocm" in capsys.readouterr().err


def _queue_one(capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["queue", "--games", "Pong", "--attn", "NA", "--seed-list", "0",
                "--preset", "smoke"]) == 0
    capsys.readouterr()


def _run_states(database_url: str) -> list[str]:
    registry = Registry(database_url)
    try:
        with registry.session() as session:
            from orchestrator.registry.models import Run

            return list(session.scalars(select(Run.state).order_by(Run.id)))
    finally:
        registry.dispose()


@pytest.mark.parametrize(("image", "message"), [
    # A string would be split into one --bind per character.
    ('path = "IMAGE"\nbinds = "/data"\n', "binds must be a list of paths"),
    ('path = "IMAGE"\nbinds = ["/data", 3]\n', "binds must be a list of paths"),
    ('path = "IMAGE"\npython = 5\n', "python must be a string, not 5"),
    ('path = ["a"]\n', "path must be a string, not ['a']"),
    ('path = "IMAGE"\nflavor = "gpu"\n', "flavor must be one of cuda, rocm"),
    ('path = "/nonexistent/x.sif"\n', "path /nonexistent/x.sif is not a file"),
])
@pytest.mark.parametrize("dry_run", [True, False])
def test_bad_image_settings_are_refused_before_any_run_is_claimed(
        workspace: Path, database_url: str, capsys: pytest.CaptureFixture[str], image: str,
        message: str, dry_run: bool) -> None:
    sif = workspace / "x.sif"
    sif.write_text("STAND-IN SIF\n")
    (workspace / "satrl.toml").write_text("[image]\n" + image.replace("IMAGE", str(sif)))
    _queue_one(capsys)
    assert run(["dispatch", *(["--dry-run"] if dry_run else [])]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert _run_states(database_url) == ["queued"]


def test_image_settings_reach_the_job_command_line(
        workspace: Path, database_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    sif = workspace / "x.sif"
    sif.write_text("STAND-IN SIF\n")
    (workspace / "satrl.toml").write_text(
        f'[image]\npath = "{sif}"\nbinds = ["/data"]\npython = "/opt/venv/bin/python"\n')
    _queue_one(capsys)
    assert run(["dispatch", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert f"--bind /data {sif} /opt/venv/bin/python -m agents.train" in out


def test_an_experiment_image_whose_file_is_gone_is_refused(
        workspace: Path, database_url: str, standin: StandIn,
        capsys: pytest.CaptureFixture[str]) -> None:
    built = _json(capsys, "image", "build", "--flavor", "cuda", "--out",
                  str(workspace / "c.sif"))
    _queue_one(capsys)
    assert run(["image", "use", str(built["image_id"])]) == 0
    Path(built["path"]).unlink()
    capsys.readouterr()
    assert run(["dispatch"]) == 2
    err = capsys.readouterr().err.strip()
    assert "is missing" in err and len(err.splitlines()) == 1
    assert _run_states(database_url) == ["queued"]
