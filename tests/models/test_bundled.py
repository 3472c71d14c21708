"""The bundled digits model (`builtin:digits`): present, small, and it knows its digits."""

from importlib import resources
from pathlib import Path

import numpy as np
import torch

from d3hr_ray import ModelSpec, decode, load_pipeline
from d3hr_ray.diagnose.agreement import _digits_classifier, _to_digits_features
from d3hr_ray.stages.generate import sample_from_noise


def test_bundled_digits_model_loads_and_is_small():
    folder = resources.files("d3hr_ray.models").joinpath("bundled", "digits")
    size = sum(f.stat().st_size for f in Path(str(folder)).rglob("*") if f.is_file())
    assert size <= 15 * 2**20, f"{size / 2**20:.1f} MB"
    pipe = load_pipeline("builtin:digits")
    spec = ModelSpec.from_pipeline(pipe)
    assert (spec.num_classes, spec.resolution, spec.latent_shape) == (10, 16, (4, 8, 8))
    assert pipe.labels == {str(i): i for i in range(10)}


def test_bundled_digits_samples_are_recognised_by_a_real_data_classifier():
    """A classifier trained on real digits labels most class-conditional samples as their class."""
    pipe = load_pipeline("builtin:digits")
    clf, held_out = _digits_classifier(0)
    labels = torch.arange(10).repeat_interleave(20)
    images = decode(
        pipe, sample_from_noise(pipe, labels, steps=25, guidance=4.0, generator=torch.Generator().manual_seed(3))
    )
    agreement = float(np.mean(clf.predict(_to_digits_features(images)) == labels.numpy()))
    assert held_out > 0.9
    assert agreement > 0.75, agreement  # chance is 0.1; an untrained model scores about that
