"""`satrl image build|list|use` end to end, with a stand-in `apptainer` on PATH, on both databases.

Apptainer cannot be installed here (CLUSTER.md). The stand-in is a small script this module writes:
it records every argument list it gets, fills the definition file's `{{ NAME }}` placeholders
as Apptainer does (--build-arg over --build-arg-file over the %arguments defaults, refusing
unknown names), checks the %files sources
exist relative to its working directory, and writes the output file; `exec IMAGE python3 -c CODE`
runs CODE with this machine's python, so the version query satrl sends is really executed and
what gets recorded is this machine's torch (once per session: its answer is then replayed).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
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
    definition_sources,
    resolve_job_image,
    source_revision,
    version_query_argv,
)
from orchestrator.registry.db import Registry
from orchestrator.registry.models import Experiment, Image
from orchestrator.settings import load_settings, settings

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
    out, definition = args[-2], args[-1]
    text = Path(definition).read_text()
    pins = {{}}
    defaults = re.search(r"^%arguments\s*$(.*?)^%", text, re.M | re.S)
    for line in defaults.group(1).splitlines() if defaults else []:
        if line.strip():
            key, _, value = line.partition("=")
            pins[key.strip()] = value.strip()
    if "--build-arg-file" in args:
        for line in Path(args[args.index("--build-arg-file") + 1]).read_text().splitlines():
            key, _, value = line.partition("=")
            pins[key.strip()] = value.strip()
    for at, arg in enumerate(args[:-1]):
        if arg == "--build-arg":
            key, _, value = args[at + 1].partition("=")
            pins[key] = value

    def fill(match):
        if match.group(1) not in pins:
            sys.exit(f"FATAL: build var {{match.group(1)}} is not defined")
        return pins[match.group(1)]

    resolved = re.sub(r"{{{{\s*(\w+)\s*}}}}", fill, text)
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
    # The version query imports torch (seconds): run once per test session, then replayed.
    cache = os.environ.get("STANDIN_APPTAINER_CACHE")
    if cache:
        import hashlib
        answer = Path(cache) / hashlib.sha256(json.dumps(command).encode()).hexdigest()
        if not answer.exists():
            done = subprocess.run(command, capture_output=True, text=True)
            sys.stderr.write(done.stderr)
            if done.returncode:
                sys.stdout.write(done.stdout)
                sys.exit(done.returncode)
            answer.write_text(done.stdout)
        sys.stdout.write(answer.read_text())
        sys.exit(0)
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


@pytest.fixture(scope="session")
def exec_answers(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where the stand-in keeps the answers of commands it executed (one folder a session)."""
    return tmp_path_factory.mktemp("standin-exec")


@pytest.fixture
def standin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, exec_answers: Path) -> StandIn:
    fake = StandIn(tmp_path / "standin")
    monkeypatch.setenv("PATH", f"{fake.bin}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("STANDIN_APPTAINER_LOG", str(fake.log))
    monkeypatch.setenv("STANDIN_APPTAINER_CACHE", str(exec_answers))
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
    assert build == {"argv": apptainer_build_argv(partial, "cuda", fakeroot=True,
                                                  build_args=source_revision(ROOT, "cuda")
                                                  .build_args()),
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


def test_default_image_path_is_under_the_workspace_named_by_definition_hash_and_sha256(
    workspace: Path, database_url: str, standin: StandIn, capsys: pytest.CaptureFixture[str],
) -> None:
    result = _json(capsys, "image", "build", "--flavor", "rocm")
    expected = (workspace / "images" / f"satrl-rocm-{definition_hash(ROOT, 'rocm')[:12]}-"
                f"{result['sha256'][:12]}.sif")
    assert result["path"] == str(expected.resolve()) and expected.is_file()
    assert hashlib.sha256(expected.read_bytes()).hexdigest() == result["sha256"]
    assert b"From: rocm/pytorch:" in expected.read_bytes()
    assert result["log"] == str(expected.resolve()) + ".build.log"
    assert sorted(p.name for p in expected.parent.iterdir()) == [expected.name,
                                                                 expected.name + ".build.log"]
    build, _query = standin.calls()
    assert "--fakeroot" not in build["argv"]
    assert build["argv"] == apptainer_build_argv(build["argv"][-2], "rocm",
                                                 build_args=source_revision(ROOT, "rocm")
                                                 .build_args())


def test_default_builds_of_new_bytes_get_their_own_file_so_planned_jobs_keep_their_digest(
    workspace: Path, database_url: str, standin: StandIn, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    first = _json(capsys, "image", "build", "--flavor", "cuda")
    _queue_one(capsys)
    assert run(["image", "use", str(first["image_id"])]) == 0
    assert run(["dispatch", "--dry-run"]) == 0
    script = capsys.readouterr().out  # a job planned now runs first["path"] with its digest
    assert f" {first['path']} python -m agents.train" in script
    assert f"export SATRL_IMAGE_DIGEST={first['sha256']}" in script

    again = _json(capsys, "image", "build", "--flavor", "cuda")  # identical bytes: same file
    assert (again["image_id"], again["path"], again["created"]) == (first["image_id"],
                                                                   first["path"], False)
    monkeypatch.setenv("STANDIN_APPTAINER_SALT", "new sources\n")
    new = _json(capsys, "image", "build", "--flavor", "cuda")
    assert new["created"] and new["path"] != first["path"]
    assert new["replaced"] == [] and new["relinked"] == []
    # The file the planned job will run still holds the digest its script exports.
    assert hashlib.sha256(Path(first["path"]).read_bytes()).hexdigest() == first["sha256"]
    assert hashlib.sha256(Path(new["path"]).read_bytes()).hexdigest() == new["sha256"]
    assert _experiment_image(database_url, "main") == first["image_id"]
    statuses = {row["id"]: row["status"] for row in _json(capsys, "image", "list")}
    assert statuses == {first["image_id"]: "current", new["image_id"]: "current"}


def test_rebuilds_at_one_out_path_same_bytes_update_new_bytes_add_a_row_stand_in_apptainer(
    workspace: Path, database_url: str, standin: StandIn, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    out = workspace / "images" / "cuda.sif"
    args = ["image", "build", "--flavor", "cuda", "--out", str(out)]
    first = _json(capsys, *args)
    _add_experiments(database_url, "main", "other")

    again = _json(capsys, *args)  # identical bytes: the same row, updated
    assert again["image_id"] == first["image_id"] and again["created"] is False
    assert len(_images(database_url)) == 1

    monkeypatch.setenv("STANDIN_APPTAINER_SALT", "another build\n")
    new = _json(capsys, *args)  # new bytes at the same path: a new row, the old one history
    assert new["created"] is True and new["image_id"] != first["image_id"]
    assert new["replaced"] == [first["image_id"]] and new["relinked"] == []
    statuses = {row["id"]: row["status"] for row in _json(capsys, "image", "list")}
    assert statuses == {first["image_id"]: "replaced", new["image_id"]: "current"}

    # The older row's file is gone from its path: choosing it is refused, nothing changes.
    capsys.readouterr()
    assert run(["image", "use", str(first["image_id"]), "-e", "other"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and f"replaced at {out.resolve()} by image" in err
    assert _experiment_image(database_url, "other") is None


def test_a_new_build_over_an_image_experiments_use_is_refused_before_building(
    workspace: Path, database_url: str, standin: StandIn, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    out = workspace / "images" / "cuda.sif"
    args = ["image", "build", "--flavor", "cuda", "--out", str(out)]
    first = _json(capsys, *args)
    _add_experiments(database_url, "main", "other")
    assert run(["image", "use", str(first["image_id"]), "-e", "other"]) == 0
    before, calls = out.read_bytes(), len(standin.calls())
    monkeypatch.setenv("STANDIN_APPTAINER_SALT", "another build\n")
    capsys.readouterr()
    assert run(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0, err
    assert f"{out.resolve()} holds image {first['image_id']}, which experiment(s) other use" \
        in err
    assert len(standin.calls()) == calls  # nothing built
    assert out.read_bytes() == before and len(_images(database_url)) == 1
    assert sorted(p.name for p in out.parent.iterdir()) == ["cuda.sif", "cuda.sif.build.log"]
    # Once no experiment uses it, the path may take new bytes.
    assert run(["image", "use", "none", "-e", "other"]) == 0
    new = _json(capsys, *args)
    assert new["created"] and new["replaced"] == [first["image_id"]]


def test_a_build_over_an_image_of_another_flavor_is_refused_before_building(
    workspace: Path, database_url: str, standin: StandIn, capsys: pytest.CaptureFixture[str],
) -> None:
    out = workspace / "images" / "two.sif"
    cuda = _json(capsys, "image", "build", "--flavor", "cuda", "--out", str(out))
    _add_experiments(database_url, "main")
    before, calls = out.read_bytes(), len(standin.calls())
    for used in (True, False):  # the flavor alone refuses it, used or not
        assert run(["image", "use", str(cuda["image_id"]) if used else "none"]) == 0
        capsys.readouterr()
        assert run(["image", "build", "--flavor", "rocm", "--out", str(out)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0, err
        assert f"{out.resolve()} holds image {cuda['image_id']}, built as cuda: a rocm build " \
            "must not replace it" in err
        assert len(standin.calls()) == calls  # nothing built
        assert out.read_bytes() == before and len(_images(database_url)) == 1
    assert _experiment_image(database_url, "main") is None


def test_an_image_removed_and_rebuilt_at_its_path_moves_experiments_only_within_its_flavor(
    workspace: Path, database_url: str, standin: StandIn, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    same, other = workspace / "images" / "same.sif", workspace / "images" / "other.sif"
    first = _json(capsys, "image", "build", "--flavor", "cuda", "--out", str(same))
    monkeypatch.setenv("STANDIN_APPTAINER_SALT", "second\n")  # other bytes, another row
    second = _json(capsys, "image", "build", "--flavor", "cuda", "--out", str(other))
    _queue_one(capsys)  # in main
    _add_experiments(database_url, "short")
    assert run(["image", "use", str(first["image_id"]), "-e", "short"]) == 0
    assert run(["image", "use", str(second["image_id"])]) == 0
    monkeypatch.setenv("STANDIN_APPTAINER_SALT", "rebuilt\n")

    same.unlink()  # removed by the user: rebuilt with the same flavor, short follows the file
    rebuilt = _json(capsys, "image", "build", "--flavor", "cuda", "--out", str(same))
    assert rebuilt["replaced"] == [first["image_id"]] and rebuilt["relinked"] == ["short"]
    assert _experiment_image(database_url, "short") == rebuilt["image_id"]

    other.unlink()  # rebuilt as rocm: main stays on its cuda image, refused at dispatch
    rocm = _json(capsys, "image", "build", "--flavor", "rocm", "--out", str(other))
    assert rocm["replaced"] == [second["image_id"]] and rocm["relinked"] == []
    assert _experiment_image(database_url, "main") == second["image_id"]
    capsys.readouterr()
    assert run(["dispatch", "--dry-run"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0, err
    assert f"runs in image {second['image_id']}, but its file {other.resolve()} now holds " \
        f"image {rocm['image_id']} (rocm)" in err
    assert _run_states(database_url) == ["queued"]


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


def _configure_image(workspace: Path, image: str) -> None:
    (workspace / "satrl.toml").write_text("[image]\n" + image)
    settings.cache_clear()


def test_a_relative_image_path_is_read_from_the_workspace_with_its_recorded_digest(
        workspace: Path, database_url: str, standin: StandIn,
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    built = _json(capsys, "image", "build", "--flavor", "cuda", "--out",
                  str(workspace / "images" / "x.sif"))
    _configure_image(workspace, 'path = "images/x.sif"\n')
    _queue_one(capsys)
    deep = workspace / "notes" / "deep"
    deep.mkdir(parents=True)
    # From the workspace itself and from a folder below it alike: the job script cd's into
    # RUN_DIR, so only the absolute path finds the image there.
    for folder in (workspace, deep):
        monkeypatch.chdir(folder)
        capsys.readouterr()
        assert run(["dispatch", "--dry-run"]) == 0, capsys.readouterr().err
        script = capsys.readouterr().out
        assert f" --nv --bind {workspace / 'runs'}:{workspace / 'runs'} {built['path']} " \
            "python -m agents.train" in script
        assert built["path"] == str((workspace / "images" / "x.sif").resolve())
        assert f"export SATRL_IMAGE_DIGEST={built['sha256']}" in script
    assert _run_states(database_url) == ["queued"]


def test_image_path_runs_with_the_flavor_recorded_for_its_file(
        workspace: Path, database_url: str, standin: StandIn,
        capsys: pytest.CaptureFixture[str]) -> None:
    built = _json(capsys, "image", "build", "--flavor", "rocm", "--out",
                  str(workspace / "r.sif"))
    _queue_one(capsys)
    for image in (f'path = "{built["path"]}"\n', f'path = "{built["path"]}"\nflavor = "rocm"\n'):
        _configure_image(workspace, image)
        assert run(["dispatch", "--dry-run"]) == 0
        script = capsys.readouterr().out
        assert "apptainer exec --rocm --bind " in script and "--nv" not in script
        assert f"export SATRL_IMAGE_DIGEST={built['sha256']}" in script
    _configure_image(workspace, f'path = "{built["path"]}"\nflavor = "cuda"\n')
    for dry_run in (True, False):
        assert run(["dispatch", *(["--dry-run"] if dry_run else [])]) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0, err
        assert f"satrl.toml [image] flavor is cuda, but {built['path']} is image " \
            f"{built['image_id']}, built as rocm" in err
    assert _run_states(database_url) == ["queued"]
    # An unrecorded file has only satrl.toml's word (cuda by default).
    plain = workspace / "plain.sif"
    plain.write_text("STAND-IN SIF\n")
    _configure_image(workspace, f'path = "{plain}"\n')
    assert run(["dispatch", "--dry-run"]) == 0
    script = capsys.readouterr().out
    assert "apptainer exec --nv --bind " in script and "SATRL_IMAGE_DIGEST=" not in script


def _git(folder: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(folder), "-c", "user.name=t", "-c",
                           "user.email=t@example.org", *args], check=True, capture_output=True,
                          text=True).stdout.strip()


@pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")
def test_each_image_records_the_source_commit_it_holds_and_exports_it(
        workspace: Path, database_url: str, standin: StandIn, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    source = tmp_path / "checkout"
    for relative in definition_sources(ROOT, "cuda"):
        if (ROOT / relative).is_dir():
            shutil.copytree(ROOT / relative, source / relative,
                            ignore=shutil.ignore_patterns("__pycache__"))
        else:
            (source / relative).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / relative, source / relative)
    (source / "images").mkdir()  # an untracked folder outside the image's files: not dirty
    _git(source, "init", "-q")
    _git(source, "add", "containers", "pyproject.toml", "README.md", "agents", "orchestrator",
         "migrations")
    _git(source, "commit", "-q", "-m", "sources")
    commit = _git(source, "rev-parse", "HEAD")

    clean = _json(capsys, "image", "build", "--flavor", "cuda", "--source", str(source))
    assert (clean["git_commit"], clean["git_dirty"]) == (commit, False)
    build = standin.calls()[0]["argv"]
    assert build[build.index(f"SATRL_GIT_COMMIT={commit}") - 1] == "--build-arg"
    assert build[build.index("SATRL_GIT_DIRTY=false") - 1] == "--build-arg"
    # Readable inside the image: its %environment exports it (and a label names it).
    sif = Path(clean["path"]).read_text()
    assert f"export SATRL_GIT_COMMIT={commit}\n" in sif
    assert "export SATRL_GIT_DIRTY=false\n" in sif
    assert f"org.satrl.git_commit {commit}\n" in sif

    with (source / "agents" / "train.py").open("a") as handle:
        handle.write("# an uncommitted change\n")
    dirty = _json(capsys, "image", "build", "--flavor", "cuda", "--source", str(source))
    assert (dirty["git_commit"], dirty["git_dirty"]) == (commit, True)
    assert "export SATRL_GIT_DIRTY=true\n" in Path(dirty["path"]).read_text()

    listed = {row["id"]: row for row in _json(capsys, "image", "list")}
    assert (listed[clean["image_id"]]["git_commit"], listed[clean["image_id"]]["git_dirty"]) \
        == (commit, False)
    assert listed[dirty["image_id"]]["git_dirty"] is True
    assert run(["image", "list"]) == 0
    table = capsys.readouterr().out
    assert f"{commit[:12]}+dirty" in table
    assert table.count(commit[:12]) == 2

    # A checkout without git history records no commit; the image says unknown.
    shutil.rmtree(source / ".git")
    bare = _json(capsys, "image", "build", "--flavor", "cuda", "--source", str(source))
    assert (bare["git_commit"], bare["git_dirty"]) == (None, None)
    assert "export SATRL_GIT_COMMIT=unknown\n" in Path(bare["path"]).read_text()
