"""Job resources: generic names with units, and the one table from them to each backend's flags.

Sources, later ones winning: defaults, satrl.toml `[resources]`, the backend's own table
(`[slurm]`, `[pbs]`, `[local]`) and the command line (`satrl dispatch --cpus 8 ...`):

    [resources]
    cpus = 16            # cores per run
    gpus = 1             # GPUs per run
    mem_gb = 64          # memory per run, GB (omitted: the scheduler's default)
    walltime_min = 720   # wall-clock limit per job, minutes (fractions allowed)

    [pbs]
    queue = "gpu"        # qsub -q
    account = "ab12"     # qsub -A
    gpu_resource = "ngpus"   # the site's name of the GPU resource in -l select=...

    [slurm]
    partition = "gpu"    # sbatch --partition (`queue` is accepted too)
    account = "ab12"
    gres = "gpu"         # --gres=<gres>:<gpus>
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, fields, replace
from typing import Any

from orchestrator.errors import UsageError

#: Keys of satrl.toml tables (and CLI flags) that are resources, each with its type.
GENERIC_KEYS = {"cpus": int, "gpus": int, "mem_gb": float, "walltime_min": float,
                "queue": str, "account": str}


@dataclass(frozen=True)
class Resources:
    """What one run's job asks the scheduler for."""

    #: Cores per run.
    cpus: int = 1
    #: GPUs per run.
    gpus: int = 0
    #: Memory per run in GB; None leaves the scheduler's default.
    mem_gb: float | None = None
    #: Wall-clock limit per job in minutes; 0 means none (only the local backend allows it).
    walltime_min: float = 60.0
    #: PBS queue or Slurm partition.
    queue: str | None = None
    #: Account or project charged.
    account: str | None = None

    @property
    def walltime_s(self) -> int:
        """The limit in whole seconds (what the job script adds to `date +%s`)."""
        return int(math.ceil(self.walltime_min * 60))

    def to_json(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def resolve_resources(settings: Any, backend: str,
                      overrides: dict[str, Any] | None = None) -> Resources:
    """Resources of `backend`'s jobs: defaults < [resources] < [<backend>] < `overrides`."""
    resources = Resources(walltime_min=0.0) if backend == "local" else Resources()
    layers = [("satrl.toml [resources]", settings.section("resources")),
              (f"satrl.toml [{backend}]", settings.section(backend)),
              ("the command line", {k: v for k, v in (overrides or {}).items() if v is not None})]
    for source, table in layers:
        values = {}
        for key, value in table.items():
            name = "queue" if key == "partition" else key
            if name not in GENERIC_KEYS:
                continue  # a backend-specific key (gres, gpu_resource, max_parallel, ...)
            values[name] = _checked(name, value, source)
        resources = replace(resources, **values)
    if resources.walltime_min == 0 and backend != "local":
        raise UsageError(f"walltime_min must be > 0 for the {backend} backend")
    return resources


def _checked(name: str, value: Any, source: str) -> Any:
    kind = GENERIC_KEYS[name]
    if kind is str:
        if not isinstance(value, str) or not value.strip():
            raise UsageError(f"{source}: {name} must be a non-empty string, not {value!r}")
        return value.strip()
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise UsageError(f"{source}: {name} must be a number, not {value!r}")
    if kind is int and not float(value).is_integer():
        raise UsageError(f"{source}: {name} must be a whole number, not {value!r}")
    minimum = 1 if name == "cpus" else 0
    if value < minimum or not math.isfinite(value) or (name == "mem_gb" and value <= 0):
        raise UsageError(f"{source}: {name} must be >= {minimum}"
                         f"{' and > 0' if name == 'mem_gb' else ''}, not {value!r}")
    return int(value) if kind is int else float(value)


def hms(seconds: int) -> str:
    """Seconds as `HH:MM:SS` (hours may exceed 24), the walltime format of PBS and Slurm."""
    hours, rest = divmod(int(seconds), 3600)
    return f"{hours:02d}:{rest // 60:02d}:{rest % 60:02d}"


def _mem_mb(mem_gb: float) -> int:
    return int(math.ceil(mem_gb * 1024))


#: A site's name of its GPU resource. Slurm's gres may name a type (`gpu:a100`); a PBS
#: resource is one word, since a `:` would add another resource to the select chunk.
SLURM_GRES = re.compile(r"[A-Za-z][A-Za-z0-9_.-]*(:[A-Za-z0-9_.-]+)?")
PBS_RESOURCE = re.compile(r"[A-Za-z][A-Za-z0-9_]*")


def resource_name(table: dict[str, Any], key: str, default: str, source: str,
                  pattern: re.Pattern[str]) -> str:
    """A GPU resource name of a satrl.toml table, checked: UsageError naming it otherwise
    (`gres = 5` went into sbatch as `--gres=5:1`)."""
    value = table.get(key, default)
    if not isinstance(value, str) or not pattern.fullmatch(value):
        raise UsageError(f"{source}: {key} must be a resource name such as {default!r}, "
                         f"not {value!r}")
    return value


def slurm_gres(table: dict[str, Any]) -> str:
    return resource_name(table, "gres", "gpu", "satrl.toml [slurm]", SLURM_GRES)


def pbs_gpu_resource(table: dict[str, Any]) -> str:
    return resource_name(table, "gpu_resource", "ngpus", "satrl.toml [pbs]", PBS_RESOURCE)


def slurm_flags(resources: Resources, table: dict[str, Any]) -> list[str]:
    """sbatch options for `resources` (`table` is satrl.toml's [slurm])."""
    flags = [f"--cpus-per-task={resources.cpus}", f"--time={hms(resources.walltime_s)}"]
    if resources.gpus:
        flags.append(f"--gres={slurm_gres(table)}:{resources.gpus}")
    if resources.mem_gb is not None:
        flags.append(f"--mem={_mem_mb(resources.mem_gb)}M")
    if resources.queue:
        flags.append(f"--partition={resources.queue}")
    if resources.account:
        flags.append(f"--account={resources.account}")
    return flags


def pbs_flags(resources: Resources, table: dict[str, Any]) -> list[str]:
    """qsub options for `resources` (`table` is satrl.toml's [pbs])."""
    select = f"select=1:ncpus={resources.cpus}"
    if resources.gpus:
        select += f":{pbs_gpu_resource(table)}={resources.gpus}"
    if resources.mem_gb is not None:
        gb = resources.mem_gb
        select += f":mem={int(gb)}gb" if float(gb).is_integer() else f":mem={_mem_mb(gb)}mb"
    flags = ["-l", select, "-l", f"walltime={hms(resources.walltime_s)}"]
    if resources.queue:
        flags += ["-q", resources.queue]
    if resources.account:
        flags += ["-A", resources.account]
    return flags
