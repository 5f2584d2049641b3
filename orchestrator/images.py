"""Worker images: which image a job runs in, how images are built, and their records.

A job runs in an image when the experiment names one (experiments.image_id, set by
`satrl image use`) or `satrl.toml` does:

    [image]
    path = "/shared/images/satrl-cuda.sif"
    flavor = "cuda"          # cuda -> apptainer --nv, rocm -> apptainer --rocm
    dir = "/shared/images"   # where `satrl image build` puts images (default: <workspace>/images)

`satrl image build --flavor cuda|rocm` runs `apptainer build` on containers/<flavor>.def from
satrl's source checkout, reads torch/CUDA/ROCm versions from inside the new image, and records it
(one images row per distinct sha256 of the .sif: rebuilding identical bytes updates that row;
new bytes at the same path make a new row, the older rows stay as history, and experiments that
used an older row at that path move to the new one, because the file their jobs will run is the
new one and the digest each attempt records must be its digest).
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


def resolve_job_image(session: Any, settings: Any, experiment: Any) -> JobImage | None:
    """The experiment's image, else satrl.toml's [image], else None (the configured python).

    An image file that is missing is refused here, before any run is claimed: every job would
    fail at once in apptainer, and auto-requeue would spend the runs' attempts on it."""
    from sqlalchemy import select

    from orchestrator.registry.models import Image

    section = image_settings(settings)
    if experiment is not None and experiment.image_id is not None:
        image = session.get(Image, experiment.image_id)
        if image is not None:
            if not Path(image.path).is_file():
                raise UsageError(f"experiment {experiment.name!r} runs in image {image.id}, whose "
                                 f"file {image.path} is missing: rebuild it (`satrl image build "
                                 f"--flavor {image.flavor}`) or choose another (`satrl image use`)")
            return JobImage(image.path, image.flavor, image.sha256)
    path = section.get("path")
    if not path:
        return None
    if not Path(path).is_file():
        raise UsageError(f"satrl.toml [image] path {path} is not a file: build an image with "
                         "`satrl image build` or fix the path")
    flavor = section.get("flavor", "cuda")
    recorded = session.scalar(select(Image).where(Image.path == str(path))
                              .order_by(Image.built_at.desc()))
    return JobImage(str(path), flavor, recorded.sha256 if recorded else section.get("digest"))


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


def apptainer_build_argv(out: str | Path, flavor: str, *, fakeroot: bool = False) -> list[str]:
    """`apptainer build` of containers/<flavor>.def into `out`, run from the source checkout.

    The pins reach the definition file's `{{ NAME }}` placeholders through --build-arg-file.
    """
    _check_flavor(flavor)
    return ["apptainer", "build", *(["--fakeroot"] if fakeroot else []),
            "--build-arg-file", PINS_FILE, str(out), f"containers/{flavor}.def"]


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
    #: Experiments moved from a replaced row to this one.
    relinked: list[str] = field(default_factory=list)
    log: str = ""

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


def default_image_path(settings: Any, flavor: str, definition_digest: str) -> Path:
    """<[image] dir, else workspace/images>/satrl-<flavor>-<definition hash prefix>.sif."""
    folder = Path(image_settings(settings).get("dir", "images")).expanduser()
    if not folder.is_absolute():
        folder = settings.workspace / folder
    return folder / f"satrl-{flavor}-{definition_digest[:12]}.sif"


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

    The image is built under a temporary name next to `out` and renamed into place only after
    its versions were read, so `out` never holds a half-built or unreadable image.
    """
    require_apptainer(flavor)
    root = source_root(source)
    digest = definition_hash(root, flavor)
    target = (out or default_image_path(settings, flavor, digest)).expanduser().resolve()
    if target.is_dir():
        raise UsageError(f"--out {target} is a folder; give the image's file name")
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.{os.getpid()}.partial")
    log = target.with_name(target.name + ".build.log")
    argv = apptainer_build_argv(partial, flavor, fakeroot=fakeroot)
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
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)
    result = BuildResult(0, flavor, str(target), sha, size, digest, versions, build_seconds,
                         created=False, log=str(log))
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
                result.relinked = []
                if result.replaced:
                    result.relinked = list(session.scalars(
                        select(Experiment.name).where(Experiment.image_id.in_(result.replaced))
                        .order_by(Experiment.name)))
                    session.execute(update(Experiment)
                                    .where(Experiment.image_id.in_(result.replaced))
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
            tuple(users.get(image.id, ())), dict(image.versions or {})))
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
