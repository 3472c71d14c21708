"""The distill job's inputs as one record: resolved and checked before Ray starts (`steps.inputs.open_job`), then
read by every step."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from d3hr_ray.artifacts.outputs import Moments
from d3hr_ray.config import DistillConfig
from d3hr_ray.data.listing import Listing
from d3hr_ray.models.info import ModelInfo

if TYPE_CHECKING:  # plan.py and the workers import this module (and each is heavy)
    from d3hr_ray.steps.plan import PlannedData
    from d3hr_ray.workers.resources import Resources

__all__ = ["Job"]


@dataclass(frozen=True)
class Job:
    """The run's inputs: the config (its model filled in), the model, the inversion timestep, the classes to distil,
    the images' native size, and the listing to read, or the statistics that --from-stats names."""

    cfg: DistillConfig
    info: ModelInfo
    timestep: int
    names: dict[int, str]
    native: int | None
    listing: Listing | PlannedData | None = None
    stats: Moments | None = None

    @property
    def model(self) -> str:
        """--model as `open_job` resolved it (the flag, the statistics file's model, or the bundled digits model)."""
        if self.cfg.model is None:
            raise ValueError("a Job's model is resolved by open_job")
        return self.cfg.model

    @property
    def data(self) -> Listing | None:
        """The listing of --data that a run reads (None with --from-stats, and for a --plan-images dry run)."""
        return self.listing if isinstance(self.listing, Listing) else None

    @property
    def output_size(self) -> int:
        return self.cfg.output_size or int(self.native or self.info.spec.resolution)

    def resolved(self, resources: Resources) -> dict[str, Any]:
        """The manifest's "resolved": the devices and actors the run used, and its sizes."""
        spec = self.info.spec
        return {
            **resources.as_dict(),
            "output_size": self.output_size,
            "resolution": spec.resolution,
            "latent_shape": list(spec.latent_shape),
            "timestep": self.timestep,
        }

    def stats_subset(self) -> dict[str, int | None] | None:
        """The manifest's "stats_subset" (--stats-per-class): the images a class and the inputs read; else None."""
        if self.cfg.stats_per_class is None:
            return None
        return {
            "per_class": self.cfg.stats_per_class,
            "inputs": sum(self.listing.counts.values()) if self.listing else None,
        }
