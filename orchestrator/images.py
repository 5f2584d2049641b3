"""Worker images: which image a job runs in, and (with the images issue) building and recording.

A job runs in an image when the experiment names one (experiments.image_id) or `satrl.toml` does:

    [image]
    path = "/shared/images/satrl-cuda.sif"
    flavor = "cuda"          # cuda -> apptainer --nv, rocm -> apptainer --rocm

The digest (sha256 of the .sif) is known when the image was recorded by `satrl image build`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from orchestrator.errors import UsageError

FLAVORS = ("cuda", "rocm")


@dataclass(frozen=True)
class JobImage:
    """The image a job script runs the worker in."""

    path: str
    flavor: str
    digest: str | None = None


def resolve_job_image(session: Any, settings: Any, experiment: Any) -> JobImage | None:
    """The experiment's image, else satrl.toml's [image], else None (the configured python)."""
    from sqlalchemy import select

    from orchestrator.registry.models import Image

    if experiment is not None and experiment.image_id is not None:
        image = session.get(Image, experiment.image_id)
        if image is not None:
            return JobImage(image.path, image.flavor, image.sha256)
    section = settings.section("image")
    path = section.get("path")
    if not path:
        return None
    flavor = section.get("flavor", "cuda")
    if flavor not in FLAVORS:
        raise UsageError(f"satrl.toml: [image] flavor must be one of {', '.join(FLAVORS)}, "
                         f"not {flavor!r}")
    recorded = session.scalar(select(Image).where(Image.path == str(path))
                              .order_by(Image.built_at.desc()))
    return JobImage(str(path), flavor, recorded.sha256 if recorded else section.get("digest"))
