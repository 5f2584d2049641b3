#!/bin/sh
# Install satrl into an image whose base already holds torch, and leave that torch alone.
#
#   usage: install.sh SRC_DIR [cuda|rocm|any]
#
# The one install script of containers/cuda.def, containers/rocm.def (%post) and the top-level
# Containerfile (RUN). Every version comes from versions.env next to this script.
#  1. Reads the base image's torch: its version string (torch.__version__, e.g. 2.8.0+cu128 or
#     2.8.0+rocm7.0.0), its installed distribution version (what pip compares; conda-built torch
#     may lack the +local tag there), its CUDA/HIP build and its location. With a flavor, checks
#     that torch is that build and the release versions.env pins for it.
#  2. Pins torch to exactly that distribution version in a constraints file.
#  3. Asks pip for its plan first (--dry-run --report) and stops, changing nothing, if the plan
#     installs any torch: a base whose torch pip cannot see would otherwise get a PyPI (CUDA) one.
#  4. Installs the project under the constraints, then requires torch's version string, build and
#     location to be unchanged; any difference fails the build.
#  5. Imports the worker, so a broken install fails here rather than in a job.
# SATRL_PYTHON names the interpreter (default: python3 on PATH, the base image's).
set -eu

die() {
    echo "install.sh: $*" >&2
    exit 1
}

[ $# -ge 1 ] || die "usage: install.sh SRC_DIR [cuda|rocm|any]"
src=$1
flavor=${2:-any}
here=$(cd "$(dirname "$0")" && pwd)
[ -f "$src/pyproject.toml" ] || die "$src/pyproject.toml not found: SRC_DIR is satrl's source tree"
[ -f "$here/versions.env" ] || die "$here/versions.env not found (it ships next to install.sh)"
# shellcheck source=versions.env
. "$here/versions.env"

case $flavor in
    cuda) expect_torch=$CUDA_TORCH_VERSION ;;
    rocm) expect_torch=$ROCM_TORCH_VERSION ;;
    any) expect_torch= ;;
    *) die "flavor must be cuda, rocm or any, not '$flavor'" ;;
esac

python=${SATRL_PYTHON:-python3}
command -v "$python" >/dev/null 2>&1 || die "no $python on PATH ($PATH)"

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
trap 'exit 130' INT TERM
# The dry run and the install share one download cache, removed with $work.
export PIP_CACHE_DIR="$work/cache" PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1 \
    PIP_ROOT_USER_ACTION=ignore PIP_PROGRESS_BAR=off

fingerprint() {
    "$python" - <<'PY'
import json
from importlib import metadata

import torch

try:
    dist = metadata.version("torch")
except metadata.PackageNotFoundError:
    dist = None
print(json.dumps({"version": str(torch.__version__), "dist": dist, "cuda": torch.version.cuda,
                  "hip": getattr(torch.version, "hip", None), "file": torch.__file__},
                 sort_keys=True))
PY
}

before=$(fingerprint) ||
    die "$python has no importable torch: the base must be an official PyTorch image"

# Check the base and print the distribution version to pin.
dist=$("$python" - "$before" "$flavor" "$expect_torch" <<'PY'
import json
import re
import sys

info, flavor, expected = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3]


def fail(message: str) -> None:
    print(f"install.sh: {message}", file=sys.stderr)
    sys.exit(1)


if info["dist"] is None:
    fail(f"torch {info['version']} imports but is no installed distribution pip can see, so "
         "pip cannot be told to keep it")
if flavor == "cuda" and not info["cuda"]:
    fail(f"flavor cuda, but the base's torch {info['version']} is not a CUDA build")
if flavor == "rocm" and not info["hip"]:
    fail(f"flavor rocm, but the base's torch {info['version']} is not a ROCm (HIP) build")
if expected:
    release = re.match(r"\d+(\.\d+)*", info["version"])
    if release is None or release.group() != expected:
        fail(f"the base's torch is {info['version']}, but versions.env pins {expected} for "
             f"{flavor}: change the base image and its pin together")
print(info["dist"])
PY
) || exit 1

printf 'torch==%s\n' "$dist" >"$work/constraints.txt"

"$python" -m pip install --dry-run --quiet --report "$work/plan.json" \
    --constraint "$work/constraints.txt" "$src" ||
    die "pip cannot install $src while keeping torch==$dist (its message is above)"
"$python" - "$work/plan.json" <<'PY' || exit 1
import json
import sys

with open(sys.argv[1]) as handle:
    plan = json.load(handle)
planned = {item["metadata"]["name"].lower(): item["metadata"]["version"]
           for item in plan.get("install", [])}
if "torch" in planned:
    print(f"install.sh: pip would install torch {planned['torch']} over the base image's torch; "
          "nothing was installed", file=sys.stderr)
    sys.exit(1)
PY

"$python" -m pip install --constraint "$work/constraints.txt" "$src"

after=$(fingerprint) || die "torch no longer imports after installing satrl"
[ "$before" = "$after" ] ||
    die "installing satrl changed the base image's torch: before $before, after $after"

"$python" -c "import agents.train, orchestrator.cli" || die "satrl does not import after install"
echo "install.sh: satrl installed ($flavor); torch kept: $after"
