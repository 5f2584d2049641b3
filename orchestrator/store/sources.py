"""Where a run directory is read from: this machine's filesystem, or a remote host via rsync/ssh.

A source only lists and copies; it never decides what is trustworthy. Listings do not follow
symbolic links (a linked file or folder is reported as a link), copies never follow them either,
and every checksum is computed afterwards on this machine from the copy.
"""

from __future__ import annotations

import os
import shlex
import shutil
import stat
import subprocess
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchestrator.errors import SatrlError, UsageError

ProgressFn = Callable[[int], None]
_CHUNK_BYTES = 1 << 20


class SourceError(SatrlError):
    """The source could not be listed or read (ssh refused, rsync failed)."""


@dataclass(frozen=True)
class SourceFile:
    """One entry of a run directory's listing, not following links."""

    type: str  # "file" | "dir" | "link" | "other"
    size_bytes: int


class Source(ABC):
    """Lists and copies files of run directories."""

    @abstractmethod
    def listing(self, run_dir: str) -> dict[str, SourceFile] | None:
        """Every entry below `run_dir` by relative posix path; None when `run_dir` is absent."""

    @abstractmethod
    def copy(self, run_dir: str, relpaths: list[str], dest: Path,
             on_bytes: ProgressFn | None = None) -> None:
        """Copy regular files `run_dir/<p>` to `dest/<p>`; ones that cannot be read stay absent."""

    @abstractmethod
    def describe(self, run_dir: str) -> str:
        """`host:path` or `path`, for messages."""

    def close(self) -> None:  # noqa: B027 - most sources hold nothing
        """Release connections."""

    def __enter__(self) -> Source:
        return self

    def __exit__(self, *_: Any) -> None:
        self.close()


class LocalSource(Source):
    """Run directories on a filesystem this machine sees (the cluster's login node, a laptop)."""

    def listing(self, run_dir: str) -> dict[str, SourceFile] | None:
        top = Path(run_dir)
        if not top.is_dir():
            return None
        found: dict[str, SourceFile] = {}
        for folder, dirnames, filenames in os.walk(top, followlinks=False):
            base = Path(folder).relative_to(top)
            for name in [*dirnames, *filenames]:
                relative = (base / name).as_posix()
                try:
                    info = os.lstat(Path(folder) / name)
                except FileNotFoundError:
                    continue
                found[relative] = SourceFile(_type(info.st_mode), info.st_size)
        return found

    def copy(self, run_dir: str, relpaths: list[str], dest: Path,
             on_bytes: ProgressFn | None = None) -> None:
        top = os.path.realpath(run_dir)
        for relative in relpaths:
            source = Path(top, relative)
            # A parent swapped for a link after the listing would lead elsewhere: refuse it.
            if os.path.realpath(source.parent) != os.path.join(top, *relative.split("/")[:-1]):
                continue
            fd = _open_regular(source)
            if fd is None:
                continue
            target = dest / relative
            with os.fdopen(fd, "rb") as reader:
                target.parent.mkdir(parents=True, exist_ok=True)
                with target.open("wb") as writer:
                    while chunk := reader.read(_CHUNK_BYTES):
                        writer.write(chunk)
                        if on_bytes:
                            on_bytes(len(chunk))

    def describe(self, run_dir: str) -> str:
        return run_dir


class RsyncSource(Source):
    """Run directories on a remote host, read with rsync over ssh (one multiplexed connection)."""

    def __init__(self, host: str, *, port: int | None = None, identity_file: str | None = None,
                 ssh_options: Iterable[str] = ()) -> None:
        self.host = host
        self._control_dir = tempfile.mkdtemp(prefix="satrl-ssh-")
        self._ssh = ["ssh", "-o", "BatchMode=yes",
                     # One ssh connection for all of a fetch's rsync calls (1,400 runs).
                     "-o", "ControlMaster=auto",
                     "-o", f"ControlPath={self._control_dir}/%C", "-o", "ControlPersist=60"]
        if port is not None:
            self._ssh += ["-p", str(port)]
        if identity_file:
            self._ssh += ["-i", str(Path(identity_file).expanduser())]
        self._ssh += list(ssh_options)

    @property
    def ssh_command(self) -> str:
        """The `-e` argument of rsync (rsync splits it like a shell would: quote each word)."""
        return " ".join(shlex.quote(word) for word in self._ssh)

    def _remote(self, run_dir: str) -> str:
        return f"{self.host}:{run_dir.rstrip('/')}/"

    def _rsync(self, args: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
        command = ["rsync", "-e", self.ssh_command, *args]
        try:
            return subprocess.run(command, capture_output=True, text=True, check=False, **kwargs)
        except FileNotFoundError:
            raise UsageError("rsync is not installed on this machine (apt-get install rsync)") \
                from None

    def listing(self, run_dir: str) -> dict[str, SourceFile] | None:
        result = self._rsync(["-r", "--list-only", "--no-h", self._remote(run_dir)])
        if result.returncode == 23 and "No such file or directory" in result.stderr:
            return None
        if result.returncode != 0:
            raise SourceError(_failure("could not list", self._remote(run_dir), result))
        return parse_list_only(result.stdout)

    def copy(self, run_dir: str, relpaths: list[str], dest: Path,
             on_bytes: ProgressFn | None = None) -> None:
        if not relpaths:
            return
        dest.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("wb", suffix=".files") as listing:
            listing.write(b"\0".join(p.encode() for p in relpaths) + b"\0")
            listing.flush()
            # No -l/-L: links are skipped, never followed. %l %n: size and name per file done.
            args = ["-t", "--from0", f"--files-from={listing.name}", "--out-format=%l %n",
                    self._remote(run_dir), f"{dest}/"]
            command = ["rsync", "-e", self.ssh_command, *args]
            # stderr goes to a file: read after stdout, a pipe could fill with warnings and
            # block rsync while we wait for its stdout.
            with tempfile.TemporaryFile("w+") as errors:
                process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=errors,
                                           text=True)
                assert process.stdout is not None
                for line in process.stdout:
                    size, _, _name = line.partition(" ")
                    if on_bytes and size.isdigit():
                        on_bytes(int(size))
                code = process.wait()
                errors.seek(0)
                stderr = errors.read()
        # 23/24: some files were missing or vanished; the caller finds them absent and says so.
        if code not in (0, 23, 24):
            raise SourceError(_failure("could not copy from", self._remote(run_dir),
                                       subprocess.CompletedProcess(command, code, "", stderr)))

    def describe(self, run_dir: str) -> str:
        return f"{self.host}:{run_dir}"

    def close(self) -> None:
        subprocess.run([*self._ssh, "-O", "exit", self.host], capture_output=True, check=False)
        shutil.rmtree(self._control_dir, ignore_errors=True)


def parse_list_only(text: str) -> dict[str, SourceFile]:
    """rsync's `--list-only --no-h` lines: `<mode> <size> <date> <time> <name>`."""
    found: dict[str, SourceFile] = {}
    for line in text.splitlines():
        fields = line.split(None, 4)
        if len(fields) < 5 or not fields[1].isdigit():
            continue
        mode, size, name = fields[0], int(fields[1]), fields[4]
        if name == ".":
            continue
        kind = {"-": "file", "d": "dir", "l": "link"}.get(mode[0], "other")
        if kind == "link":
            name = name.split(" -> ", 1)[0]
        found[name] = SourceFile(kind, size)
    return found


def _open_regular(path: Path) -> int | None:
    """A read descriptor of `path` if it is a regular file now; None: missing, a link, unreadable,
    or something else (a FIFO, a device).

    The listing said "file", but the entry can be swapped before the copy. O_NONBLOCK makes
    opening a FIFO return at once instead of waiting forever for a writer; the type is then
    checked on the descriptor itself, so nothing can change between the check and the read.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:  # missing, a link (ELOOP), unreadable: stays absent
        return None
    try:
        regular = stat.S_ISREG(os.fstat(fd).st_mode)
        if regular:
            os.set_blocking(fd, True)  # plain blocking reads from here on
    except OSError:
        regular = False
    if not regular:
        os.close(fd)
        return None
    return fd


def _type(mode: int) -> str:
    if stat.S_ISLNK(mode):
        return "link"
    if stat.S_ISREG(mode):
        return "file"
    return "dir" if stat.S_ISDIR(mode) else "other"


def _failure(what: str, where: str, result: subprocess.CompletedProcess[str]) -> str:
    tail = result.stderr.strip().splitlines()[-1:] if result.stderr else []
    return f"{what} {where}: rsync exit {result.returncode}" + (f": {tail[0]}" if tail else "")


def source_from_settings(fetch_section: dict[str, Any]) -> Source:
    """LocalSource, or RsyncSource when satrl.toml's [fetch] names a `host`."""
    host = fetch_section.get("host")
    if not host:
        return LocalSource()
    if not isinstance(host, str):
        raise UsageError("satrl.toml: [fetch] host must be a string like 'user@cluster'")
    port = fetch_section.get("port")
    if port is not None and (not isinstance(port, int) or isinstance(port, bool)):
        raise UsageError("satrl.toml: [fetch] port must be an integer")
    options = fetch_section.get("ssh_options", [])
    if isinstance(options, str):
        options = shlex.split(options)
    if not isinstance(options, list) or not all(isinstance(o, str) for o in options):
        raise UsageError("satrl.toml: [fetch] ssh_options must be a list of ssh arguments")
    identity = fetch_section.get("identity_file")
    if identity is not None and not isinstance(identity, str):
        raise UsageError("satrl.toml: [fetch] identity_file must be a path")
    return RsyncSource(host, port=port, identity_file=identity, ssh_options=options)
