"""Worker images: which image a job runs in, how images are built, and their records.

A job runs in an image when the experiment names one (experiments.image_id, set by
`satrl image use`) or `satrl.toml` does:

    [image]
    path = "/shared/images/satrl-cuda.sif"   # relative paths are read from the workspace
    flavor = "cuda"          # cuda -> apptainer --nv, rocm -> apptainer --rocm; optional for
                             # a recorded image (its recorded flavor is used; a different one
                             # here is refused)
    dir = "/shared/images"   # where `satrl image build` puts images (default: <workspace>/images)

`satrl image build --flavor cuda|rocm` runs `apptainer build` on containers/<flavor>.def from
satrl's source checkout, reads torch/CUDA/ROCm versions from inside the new image, and records it
(one images row per distinct sha256 of the .sif). Without --out each build gets its own file,
satrl-<flavor>-<definition hash>-<sha256 prefix>.sif, so a recorded path always holds the
recorded bytes and a job submitted before a rebuild still runs (and records the digest of) the
image it was planned with. With --out the file is the user's choice: rebuilding identical bytes
updates that row; new bytes at the same path make a new row and the older rows stay as history.
A build is refused before it starts where --out holds a recorded image of another flavor or one
that experiments use (their jobs would silently run other bytes than the digest they record);
remove the file, or move the experiments (`satrl image use`), first. Where the file at a path
was removed and rebuilt with the same flavor, the experiments of the older rows there move to
the new one (the file their jobs will run is the new one).

Each build records the source checkout's commit (`git rev-parse HEAD`) and whether the files the
image copies differ from it (`git status --porcelain`), and passes both into the image as build
arguments that its %environment exports as SATRL_GIT_COMMIT and SATRL_GIT_DIRTY (the image copies
the sources without .git, so the worker cannot read them there).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from orchestrator.errors import NotFoundError, SatrlError, UsageError

FLAVORS = ("cuda", "rocm")
#: Apptainer's GPU option per flavor. Never both: given both, Apptainer applies only --nv.
GPU_FLAGS = {"cuda": "--nv", "rocm": "--rocm"}
#: The one file holding every version pin of the images (read by install.sh and apptainer).
PINS_FILE = "containers/versions.env"
INSTALL_SCRIPT = "containers/install.sh"
#: Build arguments besides the pins: the source revision an image holds. The definition files
#: default them to "unknown" (%arguments) and export them in %environment for the worker.
GIT_COMMIT_VAR = "SATRL_GIT_COMMIT"
GIT_DIRTY_VAR = "SATRL_GIT_DIRTY"
UNKNOWN_REVISION = "unknown"
#: Printed as one JSON line by the image's python: what the images row records.
VERSION_QUERY = """\
import json, platform
from importlib import metadata
out = {"python": platform.python_version()}
for name in ("satrl", "torch", "stable-baselines3", "gymnasium", "ale-py", "numpy"):
    try:
        out[name] = metadata.version(name)
    except metadata.PackageNotFoundError:
        out[name] = None
try:
    import torch
    out.update(torch_version=str(torch.__version__), cuda=torch.version.cuda,
               rocm=getattr(torch.version, "hip", None))
except ImportError as error:
    out.update(torch_version=None, cuda=None, rocm=None, torch_error=str(error))
print(json.dumps(out, sort_keys=True))
"""
_HASH_CHUNK_BYTES = 1 << 20


@dataclass(frozen=True)
class JobImage:
    """The image a job script runs the worker in."""

    path: str
    flavor: str
    digest: str | None = None


def image_settings(settings: Any) -> dict[str, Any]:
    """satrl.toml's [image], its types checked before any job is planned: a string where the
    list of binds belongs would be split into one --bind per character, a number as the
    python would be written into every job script."""
    section = settings.section("image")
    source = "satrl.toml [image]"
    for key in ("path", "flavor", "python", "dir", "digest"):
        value = section.get(key)
        if key in section and not isinstance(value, str):
            raise UsageError(f"{source} {key} must be a string, not {value!r}")
        if key != "path" and key in section and not value.strip():
            raise UsageError(f"{source} {key} must not be empty")
    binds = section.get("binds", [])
    if not isinstance(binds, list) or not all(isinstance(b, str) and b.strip() for b in binds):
        raise UsageError(f"{source} binds must be a list of paths (binds = [\"/data\"]), "
                         f"not {binds!r}")
    if section.get("flavor", "cuda") not in FLAVORS:
        raise UsageError(f"{source} flavor must be one of {', '.join(FLAVORS)}, "
                         f"not {section['flavor']!r}")
    return section


def configured_image_path(settings: Any) -> Path | None:
    """satrl.toml's [image] path, absolute: a relative one is read from the workspace (as [image]
    dir and scratch are), never from the folder satrl runs in or the job's run directory."""
    path = image_settings(settings).get("path")
    if not path:
        return None
    resolved = Path(path).expanduser()
    if not resolved.is_absolute():
        resolved = settings.workspace / resolved
    return resolved.resolve()


def _newest_at(session: Any, path: str) -> Any:
    """The newest images row recorded at `path` (the one whose file is there), or None."""
    from sqlalchemy import select

    from orchestrator.registry.models import Image

    return session.scalar(select(Image).where(Image.path == path)
                          .order_by(Image.built_at.desc(), Image.id.desc()).limit(1))


def resolve_job_image(session: Any, settings: Any, experiment: Any) -> JobImage | None:
    """The experiment's image, else satrl.toml's [image], else None (the configured python).

    An image file that is missing is refused here, before any run is claimed: every job would
    fail at once in apptainer, and auto-requeue would spend the runs' attempts on it. So is an
    experiment image whose path now holds another image (its jobs would run other bytes than
    the digest they record), and a satrl.toml flavor that disagrees with the recorded one."""
    from orchestrator.registry.models import Image

    section = image_settings(settings)
    if experiment is not None and experiment.image_id is not None:
        image = session.get(Image, experiment.image_id)
        if image is not None:
            if not Path(image.path).is_file():
                raise UsageError(f"experiment {experiment.name!r} runs in image {image.id}, whose "
                                 f"file {image.path} is missing: rebuild it (`satrl image build "
                                 f"--flavor {image.flavor}`) and choose the new image, or choose "
                                 "another (`satrl image use`)")
            newest = _newest_at(session, image.path)
            if newest is not None and newest.id != image.id:
                raise UsageError(f"experiment {experiment.name!r} runs in image {image.id}, but "
                                 f"its file {image.path} now holds image {newest.id} "
                                 f"({newest.flavor}): choose the image to run with `satrl image "
                                 "use`")
            return JobImage(image.path, image.flavor, image.sha256)
    path = configured_image_path(settings)
    if path is None:
        return None
    if not path.is_file():
        raise UsageError(f"satrl.toml [image] path {path} is not a file: build an image with "
                         "`satrl image build` or fix the path")
    recorded = _newest_at(session, str(path))
    if recorded is None:
        return JobImage(str(path), section.get("flavor", "cuda"), section.get("digest"))
    if "flavor" in section and section["flavor"] != recorded.flavor:
        raise UsageError(f"satrl.toml [image] flavor is {section['flavor']}, but {path} is "
                         f"image {recorded.id}, built as {recorded.flavor}: fix or remove "
                         "[image] flavor")
    return JobImage(str(path), recorded.flavor, recorded.sha256)


# --- command lines --------------------------------------------------------------------------
def _check_flavor(flavor: str) -> None:
    if flavor not in FLAVORS:
        raise UsageError(f"image flavor must be one of {', '.join(FLAVORS)}, not {flavor!r}")


def require_apptainer(flavor: str) -> None:
    """Refuse a build early (before any file or row is touched) without a flavor or apptainer."""
    _check_flavor(flavor)
    if shutil.which("apptainer") is None:
        raise SatrlError("apptainer is not installed (not on PATH): build images on a machine "
                         "with Apptainer, e.g. the cluster's login node")


def apptainer_exec_argv(image: JobImage, binds: list[str], argv: list[str]) -> list[str]:
    """`apptainer exec` of `argv` in `image`: the flavor's GPU flag and binds, then the image."""
    _check_flavor(image.flavor)
    command = ["apptainer", "exec", GPU_FLAGS[image.flavor]]
    for bind in binds:
        if not bind:
            raise UsageError("an empty bind path was given for apptainer exec")
        command += ["--bind", bind]
    return [*command, image.path, *argv]


def apptainer_build_argv(out: str | Path, flavor: str, *, fakeroot: bool = False,
                         build_args: dict[str, str] | None = None) -> list[str]:
    """`apptainer build` of containers/<flavor>.def into `out`, run from the source checkout.

    The pins reach the definition file's `{{ NAME }}` placeholders through --build-arg-file,
    `build_args` (the source revision) through one --build-arg each.
    """
    _check_flavor(flavor)
    extra: list[str] = []
    for name, value in (build_args or {}).items():
        extra += ["--build-arg", f"{name}={value}"]
    return ["apptainer", "build", *(["--fakeroot"] if fakeroot else []),
            "--build-arg-file", PINS_FILE, *extra, str(out), f"containers/{flavor}.def"]


def version_query_argv(image_path: str | Path) -> list[str]:
    """Ask the image's python for its torch/CUDA/ROCm and package versions (no GPU needed)."""
    return ["apptainer", "exec", str(image_path), "python3", "-c", VERSION_QUERY]


# --- the definition and its inputs ----------------------------------------------------------
def definition_files(flavor: str) -> tuple[str, ...]:
    """What an image of `flavor` is built from, besides the project's sources."""
    _check_flavor(flavor)
    return (f"containers/{flavor}.def", INSTALL_SCRIPT, PINS_FILE)


def definition_hash(root: Path, flavor: str) -> str:
    """sha256 over the definition file, install.sh and the pins file (names and contents)."""
    digest = hashlib.sha256()
    for relative in definition_files(flavor):
        data = (root / relative).read_bytes()
        digest.update(f"{relative}\0{len(data)}\0".encode())
        digest.update(data)
    return digest.hexdigest()


def definition_sources(root: Path, flavor: str) -> tuple[str, ...]:
    """Everything an image of `flavor` holds from the checkout: its definition inputs and the
    sources its %files section copies (relative to the checkout)."""
    sources = list(definition_files(flavor))
    in_files = False
    for line in (root / f"containers/{flavor}.def").read_text().splitlines():
        if line.startswith("%"):
            in_files = line.split()[0] == "%files"
        elif in_files and line.strip() and not line.lstrip().startswith("#"):
            sources.append(line.split()[0])
    return tuple(dict.fromkeys(sources))


@dataclass(frozen=True)
class SourceRevision:
    """The commit of the checkout an image is built from, and whether its files differ from it."""

    commit: str | None
    dirty: bool | None

    def build_args(self) -> dict[str, str]:
        dirty = UNKNOWN_REVISION if self.dirty is None else str(self.dirty).lower()
        return {GIT_COMMIT_VAR: self.commit or UNKNOWN_REVISION, GIT_DIRTY_VAR: dirty}


def source_revision(root: Path, flavor: str) -> SourceRevision:
    """`git rev-parse HEAD` of `root`, dirty when `git status --porcelain` lists any file the
    image is built from. No git, or not a git checkout: unknown (None), which is no error:
    a build from a source archive has no commit to record."""
    git = shutil.which("git")
    if git is None:
        return SourceRevision(None, None)
    head = subprocess.run([git, "-C", str(root), "rev-parse", "--verify", "--quiet", "HEAD"],
                          capture_output=True, text=True, errors="replace")
    commit = head.stdout.strip()
    if head.returncode != 0 or not commit:
        return SourceRevision(None, None)
    status = subprocess.run([git, "-C", str(root), "status", "--porcelain", "--",
                             *definition_sources(root, flavor)],
                            capture_output=True, text=True, errors="replace")
    return SourceRevision(commit, bool(status.stdout.strip()) if status.returncode == 0 else None)


def read_pins(root: Path) -> dict[str, str]:
    """containers/versions.env as a dict (KEY=VALUE lines, as apptainer and sh read them)."""
    pins: dict[str, str] = {}
    for number, line in enumerate((root / PINS_FILE).read_text().splitlines(), 1):
        if not line.strip():
            continue
        key, sep, value = line.partition("=")
        if not sep or not key.strip() or not value.strip():
            raise UsageError(f"{PINS_FILE}:{number}: expected KEY=VALUE, not {line!r}")
        pins[key.strip()] = value.strip()
    return pins


def source_root(source: Path | None = None) -> Path:
    """satrl's source checkout (the folder holding containers/): given, else this package's."""
    root = (source or Path(__file__).resolve().parents[1]).resolve()
    if not (root / PINS_FILE).is_file():
        raise UsageError(f"{root} is not a satrl source checkout ({PINS_FILE} is missing): "
                         "image builds need the sources; pass --source DIR of a clone")
    return root


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(_HASH_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


# --- build ----------------------------------------------------------------------------------
class ImageBuildError(SatrlError):
    """apptainer failed or printed something unreadable; carries the command and output tail."""

    def __init__(self, message: str, *, command: list[str], output: str = "",
                 log: Path | None = None) -> None:
        # No [brackets]: the CLI prints errors with rich markup, which would swallow them.
        detail = f"{message}; command: {' '.join(command)}"
        lines = [line for line in output.strip().splitlines() if line.strip()]
        if lines:
            detail += f"; output: {lines[-1][:300]}"
        if log is not None:
            detail += f"; log: {log}"
        super().__init__(detail)
        self.command = command
        self.output = output
        self.log = log


@dataclass
class BuildResult:
    """What `satrl image build` did."""

    image_id: int
    flavor: str
    path: str
    sha256: str
    size_bytes: int
    definition_hash: str
    versions: dict[str, Any]
    build_seconds: float
    created: bool
    #: Older rows whose file at the same path this build replaced.
    replaced: list[int] = field(default_factory=list)
    #: Experiments moved from a replaced row (of the same flavor) to this one.
    relinked: list[str] = field(default_factory=list)
    log: str = ""
    #: The source checkout's commit the image holds (None: unknown), and whether the files the
    #: image copies differed from it.
    git_commit: str | None = None
    git_dirty: bool | None = None

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


def image_folder(settings: Any) -> Path:
    """Where builds without --out go: [image] dir (relative: to the workspace), else images/."""
    folder = Path(image_settings(settings).get("dir", "images")).expanduser()
    if not folder.is_absolute():
        folder = settings.workspace / folder
    return folder


def default_image_path(settings: Any, flavor: str, definition_digest: str, sha256: str) -> Path:
    """<image folder>/satrl-<flavor>-<definition hash prefix>-<sha256 prefix>.sif: a name of its
    own for every content, so a rebuild never replaces the file a planned job will run."""
    return image_folder(settings) / f"satrl-{flavor}-{definition_digest[:12]}-{sha256[:12]}.sif"


def refuse_overwrite(registry: Any, target: Path, flavor: str, sha256: str | None = None) -> None:
    """Refuse to put a `flavor` image with `sha256` (None: not built yet) at `target` where the
    file there is a recorded image of another flavor, or one that experiments use: their jobs
    would run other bytes (or with the other GPU flag) than the image they record. A file the
    user removed first, an unrecorded file, or identical bytes are no obstacle."""
    from sqlalchemy import select

    from orchestrator.registry.models import Experiment, Image

    if not target.is_file():
        return
    with registry.session() as session:
        current = _newest_at(session, str(target))
        if current is None or current.sha256 == sha256:
            return
        if current.flavor != flavor:
            raise UsageError(f"{target} holds image {current.id}, built as {current.flavor}: "
                             f"a {flavor} build must not replace it; remove the file first or "
                             "give another --out")
        users = list(session.scalars(
            select(Experiment.name).join(Image, Experiment.image_id == Image.id)
            .where(Image.path == str(target)).order_by(Experiment.name)))
        if users:
            raise UsageError(f"{target} holds image {current.id}, which experiment(s) "
                             f"{', '.join(users)} use: a new build there would change the file "
                             "their jobs run; build without --out (every build gets its own file) "
                             "or move them to another image first (`satrl image use`)")


def _run_logged(argv: list[str], cwd: Path, log: Path,
                on_line: Callable[[str], None] | None) -> tuple[int, str]:
    """Run `argv`, its output going to `log` (and `on_line`); return code and output tail."""
    tail: deque[str] = deque(maxlen=40)
    with log.open("w") as sink:
        sink.write(f"$ cd {cwd} && {' '.join(argv)}\n")
        process = subprocess.Popen(argv, cwd=cwd, stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, text=True, errors="replace")
        assert process.stdout is not None
        for line in process.stdout:
            sink.write(line)
            tail.append(line.rstrip("\n"))
            if on_line is not None:
                on_line(line.rstrip("\n"))
        returncode = process.wait()
    return returncode, "\n".join(tail)


def read_image_versions(image_path: Path) -> dict[str, Any]:
    """The versions the image's own python reports (VERSION_QUERY's JSON line)."""
    argv = version_query_argv(image_path)
    result = subprocess.run(argv, capture_output=True, text=True, errors="replace")
    if result.returncode != 0:
        raise ImageBuildError(f"reading versions from {image_path} failed "
                              f"(exit {result.returncode})", command=argv[:4] + ["..."],
                              output=result.stderr or result.stdout)
    for line in reversed(result.stdout.strip().splitlines()):
        try:
            versions = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(versions, dict):
            return versions
    raise ImageBuildError(f"{image_path}'s python printed no version JSON",
                          command=argv[:4] + ["..."], output=result.stdout + result.stderr)


def build_image(registry: Any, settings: Any, flavor: str, *, out: Path | None = None,
                fakeroot: bool = False, source: Path | None = None,
                on_line: Callable[[str], None] | None = None) -> BuildResult:
    """Build containers/<flavor>.def with apptainer and record the image (module docstring).

    The image is built under a temporary name in its folder and renamed into place only after
    its versions were read and its sha256 taken, so the final path never holds a half-built or
    unreadable image; without --out that name carries the sha256 prefix.
    """
    require_apptainer(flavor)
    root = source_root(source)
    digest = definition_hash(root, flavor)
    target: Path | None = None
    if out is not None:
        target = out.expanduser().resolve()
        if target.is_dir():
            raise UsageError(f"--out {target} is a folder; give the image's file name")
        refuse_overwrite(registry, target, flavor)  # before hours of building
        folder, stem = target.parent, target.name
    else:
        folder, stem = image_folder(settings).resolve(), f"satrl-{flavor}-{digest[:12]}.sif"
    folder.mkdir(parents=True, exist_ok=True)
    partial = folder / f".{stem}.{os.getpid()}.partial"
    log = folder / f"{stem}.build.log"
    revision = source_revision(root, flavor)
    argv = apptainer_build_argv(partial, flavor, fakeroot=fakeroot,
                                build_args=revision.build_args())
    started = time.monotonic()
    try:
        returncode, tail = _run_logged(argv, root, log, on_line)
        if returncode != 0:
            raise ImageBuildError(f"apptainer build exited {returncode}", command=argv,
                                  output=tail, log=log)
        if not partial.is_file():
            raise ImageBuildError(f"apptainer build wrote no image at {partial}", command=argv,
                                  output=tail, log=log)
        build_seconds = time.monotonic() - started
        versions = read_image_versions(partial)
        sha = sha256_file(partial)
        size = partial.stat().st_size
        named = target is None
        if target is None:
            target = default_image_path(settings, flavor, digest, sha).resolve()
        refuse_overwrite(registry, target, flavor, sha)  # again: another build may have landed
        if named:
            final_log = target.with_name(target.name + ".build.log")
            os.replace(log, final_log)
            log = final_log
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)
    versions.update(git_commit=revision.commit, git_dirty=revision.dirty)
    result = BuildResult(0, flavor, str(target), sha, size, digest, versions, build_seconds,
                         created=False, log=str(log), git_commit=revision.commit,
                         git_dirty=revision.dirty)
    record_image(registry, result)
    return result


def record_image(registry: Any, result: BuildResult) -> None:
    """Insert or update the images row of `result.sha256`; relink experiments (docstring)."""
    from sqlalchemy import select, update
    from sqlalchemy.exc import IntegrityError

    from orchestrator.registry.models import Experiment, Image, utcnow

    for attempt in range(2):  # a concurrent build of identical bytes may insert first
        try:
            with registry.write() as session:
                image = session.scalar(select(Image).where(Image.sha256 == result.sha256))
                result.created = image is None
                if image is None:
                    image = Image(sha256=result.sha256)
                    session.add(image)
                image.flavor = result.flavor
                image.definition_hash = result.definition_hash
                image.path = result.path
                image.size_bytes = result.size_bytes
                image.torch_version = result.versions.get("torch_version")
                image.cuda_version = result.versions.get("cuda")
                image.rocm_version = result.versions.get("rocm")
                image.versions = result.versions
                image.built_at = utcnow()
                image.build_seconds = result.build_seconds
                session.flush()
                result.image_id = image.id
                result.replaced = list(session.scalars(
                    select(Image.id).where(Image.path == result.path, Image.id != image.id)
                    .order_by(Image.id)))
                # Only rows of the same flavor: an experiment never changes GPU stack unasked
                # (one left on a row of the other flavor is refused at dispatch).
                same_flavor = list(session.scalars(
                    select(Image.id).where(Image.id.in_(result.replaced),
                                           Image.flavor == result.flavor)))
                result.relinked = []
                if same_flavor:
                    result.relinked = list(session.scalars(
                        select(Experiment.name).where(Experiment.image_id.in_(same_flavor))
                        .order_by(Experiment.name)))
                    session.execute(update(Experiment)
                                    .where(Experiment.image_id.in_(same_flavor))
                                    .values(image_id=image.id))
            return
        except IntegrityError:
            if attempt:
                raise


# --- list and use ---------------------------------------------------------------------------
@dataclass(frozen=True)
class ImageInfo:
    """One images row as `satrl image list` shows it."""

    id: int
    flavor: str
    path: str
    size_bytes: int
    sha256: str
    definition_hash: str
    torch_version: str | None
    cuda_version: str | None
    rocm_version: str | None
    built_at: str
    build_seconds: float | None
    #: current (the file at path is this image), replaced (a newer row has the path), missing.
    status: str
    experiments: tuple[str, ...]
    versions: dict[str, Any]
    #: The source commit the image holds (None: unknown, e.g. built before commits were
    #: recorded) and whether its files differed from that commit.
    git_commit: str | None = None
    git_dirty: bool | None = None

    def to_json(self) -> dict[str, Any]:
        data = dict(self.__dict__)
        data["experiments"] = list(self.experiments)
        return data


def _replaced_by(session: Any) -> dict[int, int]:
    """Row id -> the id of the newest row recorded at the same path, for superseded rows."""
    from sqlalchemy import select

    from orchestrator.registry.models import Image

    newest: dict[str, int] = {}
    rows = session.execute(select(Image.id, Image.path).order_by(Image.built_at, Image.id)).all()
    for image_id, path in rows:
        newest[path] = image_id
    return {image_id: newest[path] for image_id, path in rows if newest[path] != image_id}


def list_images(session: Any, flavor: str | None = None) -> list[ImageInfo]:
    """Every recorded image, newest first, with the experiments that use it."""
    from sqlalchemy import select

    from orchestrator.registry.models import Experiment, Image

    if flavor is not None:
        _check_flavor(flavor)
    users: dict[int, list[str]] = {}
    for name, image_id in session.execute(select(Experiment.name, Experiment.image_id)
                                          .where(Experiment.image_id.is_not(None))
                                          .order_by(Experiment.name)):
        users.setdefault(image_id, []).append(name)
    replaced = _replaced_by(session)
    statement = select(Image).order_by(Image.built_at.desc(), Image.id.desc())
    if flavor is not None:
        statement = statement.where(Image.flavor == flavor)
    infos = []
    for image in session.scalars(statement):
        status = ("replaced" if image.id in replaced
                  else "current" if Path(image.path).is_file() else "missing")
        infos.append(ImageInfo(
            image.id, image.flavor, image.path, image.size_bytes, image.sha256,
            image.definition_hash, image.torch_version, image.cuda_version, image.rocm_version,
            image.built_at.isoformat(), image.build_seconds, status,
            tuple(users.get(image.id, ())), dict(image.versions or {}),
            (image.versions or {}).get("git_commit"), (image.versions or {}).get("git_dirty")))
    return infos


def find_image(session: Any, ref: str) -> Any:
    """An images row by id (`3`) or by a unique sha256 prefix of at least 8 hex digits."""
    from sqlalchemy import select

    from orchestrator.registry.models import Image
    from orchestrator.registry.queries import parse_id

    ref = ref.strip().lower()
    if ref.isdigit():
        image_id = parse_id(ref)
        # An id no key can have (too large, non-ASCII digits) names no image either.
        image = session.get(Image, image_id) if image_id is not None else None
        if image is None:
            raise NotFoundError(f"no image with id {ref}; `satrl image list` shows them")
        return image
    if len(ref) < 8 or any(c not in "0123456789abcdef" for c in ref):
        raise UsageError(f"IMAGE must be an image id or a sha256 prefix (8+ hex digits), "
                         f"not {ref!r}")
    matches = list(session.scalars(select(Image).where(Image.sha256.startswith(ref)).limit(2)))
    if not matches:
        raise NotFoundError(f"no image whose sha256 starts with {ref}")
    if len(matches) > 1:
        raise UsageError(f"sha256 prefix {ref} matches several images; give more digits")
    return matches[0]


@dataclass(frozen=True)
class UseResult:
    experiment: str
    image_id: int | None
    previous_id: int | None
    path: str | None
    flavor: str | None
    sha256: str | None

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


def use_image(registry: Any, experiment_name: str, ref: str) -> UseResult:
    """Make `experiment_name`'s jobs run in image `ref` (`none`: back to satrl.toml / python)."""
    from orchestrator.registry.queries import get_experiment

    with registry.write() as session:
        experiment = get_experiment(session, experiment_name)
        previous = experiment.image_id
        if ref.strip().lower() == "none":
            experiment.image_id = None
            return UseResult(experiment.name, None, previous, None, None, None)
        image = find_image(session, ref)
        newer = _replaced_by(session).get(image.id)
        if newer is not None:
            raise UsageError(f"image {image.id} was replaced at {image.path} by image {newer}: "
                             f"the file there is image {newer}'s; use {newer}")
        if not Path(image.path).is_file():
            raise UsageError(f"image {image.id}'s file {image.path} is missing; rebuild it with "
                             f"`satrl image build --flavor {image.flavor}`")
        experiment.image_id = image.id
        return UseResult(experiment.name, image.id, previous, image.path, image.flavor,
                         image.sha256)
