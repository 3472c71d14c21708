"""The model actors: encode+invert batch defaults (sub-batch sizes per device, chunks sized to GPU memory), and
generation of a group of classes batched (the GPU path) or class by class (the CPU path)."""

import io

import numpy as np
import pytest
import torch

from d3hr_ray.config import DistillConfig
from d3hr_ray.flags import ConfigError
from d3hr_ray.workers import actors
from d3hr_ray.workers.actors import EncodeInvertStats, EncodeSpec, default_batch_size, gpu_chunk_size, unpack_partial


def test_default_batch_size_per_device():
    assert default_batch_size("cpu") == 64  # the CPU default is what it always was
    assert default_batch_size("cuda") == actors.GPU_BATCH


@pytest.mark.parametrize("free_gib", [0.01, 1, 10, 22, 39, 70, 140, 1000])
def test_gpu_chunk_size_is_largest_power_of_two_that_fits(free_gib):
    free = int(free_gib * 2**30)
    n = gpu_chunk_size(free, vae_channels=128, resolution=256)

    def planned(k):  # bytes for k images
        return actors._PEAK_BYTES_PER_CHANNEL_PIXEL * 128 * 256 * 256 * k

    assert n >= 1 and n & (n - 1) == 0 and n <= actors.GPU_BATCH
    if n > 1:
        assert planned(n) <= actors._MEMORY_SHARE * free  # fits
    if n < actors.GPU_BATCH:
        assert planned(2 * n) > actors._MEMORY_SHARE * free  # twice as many would not


def test_config_batch_size_optional():
    assert DistillConfig().batch_size is None and DistillConfig(batch_size=8).batch_size == 8
    assert DistillConfig().compile == "auto"
    with pytest.raises(ConfigError, match="--batch-size"):
        DistillConfig(batch_size=0)


def test_chunked_sub_batch_gives_the_same_statistics():
    spec = EncodeSpec(
        model="builtin:digits",
        device="cpu",
        dtype="float32",
        mode="sample",
        seed=0,
        steps=10,
        inversion_step=3,
        guidance=4.0,
        threads=1,
    )
    actor = EncodeInvertStats(spec)
    r = actor.spec.resolution
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (5, 3, r, r), dtype=np.uint8)
    meta = '{"labels": [0, 1, 1, 2, 2], "keys": ["a", "b", "c", "d", "e"], "read": {}, "skipped": []}'
    batch = {
        "shard": np.array([0]),
        "part": np.array([0]),
        "parts": np.array([1]),
        "pixels": np.array([pixels.tobytes()], dtype=object),
        "meta": np.array([meta], dtype=object),
    }
    whole = unpack_partial(actor(batch)["partial"][0])
    actor.chunk = 2  # what a GPU actor with little free memory would pick
    chunked = unpack_partial(actor(batch)["partial"][0])
    assert whole.keys() == chunked.keys()
    for k in whole:  # per-image noise is keyed by the image: chunking changes only float rounding
        torch.testing.assert_close(chunked[k], whole[k], rtol=1e-4, atol=1e-5)


def _generator_actor(batched: bool, chunk):
    """GenerateClasses without Ray (its constructor only adds ray.get of the statistics): the digits model,
    made-up class statistics, a short DDIM grid."""
    from d3hr_ray.models.loading import load_pipeline
    from d3hr_ray.stages.diffusion import ModelSpec
    from d3hr_ray.workers.actors import GenerateClasses, GenerateSpec

    actor = object.__new__(GenerateClasses)
    actor.cfg = GenerateSpec(
        model="builtin:digits",
        device="cpu",
        dtype="float32",
        ipc=2,
        candidates=500,
        seed=3,
        weights=(1.0, 1.0, 0.1),
        latents="d3hr",
        steps=10,
        start_step=3,
        guidance=4.0,
        output_size=8,
        threads=1,
    )
    actor.pipe = load_pipeline("builtin:digits", device="cpu", dtype=torch.float32)
    actor.spec = ModelSpec.from_pipeline(actor.pipe)
    g = torch.Generator().manual_seed(0)
    actor.mean = torch.randn(actor.spec.num_classes, actor.spec.latent_dim, generator=g)
    actor.std = torch.rand(actor.spec.num_classes, actor.spec.latent_dim, generator=g) + 0.5
    actor.batched, actor.chunk = batched, chunk
    return actor


def test_a_group_of_classes_gives_each_class_its_own_rows_batched_or_class_by_class():
    """The GPU path (the group's images in one batch, here in chunks of 3) against the CPU path (class by class):
    the same rows in the same order, the same selected latents and scores, and images equal up to float rounding."""
    from PIL import Image

    batch = {"classes": np.array([[4, 5, 6]])}
    one = _generator_actor(False, None)(batch)
    grouped = _generator_actor(True, 3)(batch)  # 6 images in chunks of 3: a chunk spans two classes
    assert one["label"].tolist() == grouped["label"].tolist() == [4, 4, 5, 5, 6, 6]
    assert one["k"].tolist() == grouped["k"].tolist() == [0, 1] * 3
    assert np.array_equal(one["latent"], grouped["latent"]) and np.array_equal(one["score"], grouped["score"])

    def pixels(png):
        return np.asarray(Image.open(io.BytesIO(png)), dtype=np.int16)

    for a, b in zip(one["png"], grouped["png"], strict=True):
        assert np.abs(pixels(a) - pixels(b)).max() <= 1
    # And a class alone gives the same bytes as in the group, class by class (the CPU path).
    alone = _generator_actor(False, None)({"classes": np.array([[5]])})
    assert list(alone["png"]) == list(one["png"][2:4])
