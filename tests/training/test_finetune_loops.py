"""The finetune workers' pieces that run without Ray Train: loop configs, the sample grid (the training rows are
data/preprocess.py's, tested in tests/data/test_preprocess.py).

The loops themselves run under a real TorchTrainer in tests/test_finetune.py.
"""

import dataclasses
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from d3hr_ray.training.finetune_loops import (
    SAMPLE_GRID_PER_CLASS,
    DiTLoopConfig,
    VAELoopConfig,
    _grid_png,
)


def test_loop_configs_are_frozen_and_travel_by_pickle():
    import ray.train

    cfg = DiTLoopConfig(
        vae_checkpoint=ray.train.Checkpoint.from_directory("/tmp"),
        vae_subdir="vae",
        transformer_config={"num_layers": 2},
        init_transformer=None,
        scheduler_config={},
        output="out",
        epochs=2,
        batch_size=8,
        lr=1e-3,
        class_dropout=0.1,
        sample_steps=2,
        seed=0,
    )
    back = pickle.loads(pickle.dumps(cfg))  # what Ray does to train_loop_config
    assert back.transformer_config == cfg.transformer_config and back.vae_checkpoint.path == cfg.vae_checkpoint.path
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.epochs = 3
    with pytest.raises(ValueError, match="epochs"):
        VAELoopConfig(
            vae_config={"latent_channels": 4, "block_out_channels": [8]},
            epochs=0,
            batch_size=1,
            lr=1.0,
            kl_weight=0.0,
            seed=0,
        )
    with pytest.raises(ValueError, match="AutoencoderKL"):
        VAELoopConfig(vae_config={}, epochs=1, batch_size=1, lr=1.0, kl_weight=0.0, seed=0)
    with pytest.raises(ValueError, match="class_dropout"):
        dataclasses.replace(cfg, class_dropout=1.0)


def test_sample_grid_layout():
    """torchvision's grid: a 2-pixel border around every R x R image, SAMPLE_GRID_PER_CLASS images per row."""
    import io

    r, n = 4, 2 * SAMPLE_GRID_PER_CLASS
    images = torch.rand(n, 3, r, r, generator=torch.Generator().manual_seed(0))
    grid = np.asarray(Image.open(io.BytesIO(_grid_png(images, SAMPLE_GRID_PER_CLASS))))
    assert grid.shape == (2 * (r + 2) + 2, SAMPLE_GRID_PER_CLASS * (r + 2) + 2, 3)
    # Image 9 is row 1, column 1; pixels are round(255 x), as save_image writes them.
    want = np.floor(images[9].numpy() * 255 + 0.5).astype(np.uint8).transpose(1, 2, 0)
    np.testing.assert_array_equal(grid[2 + (r + 2) : 2 + (r + 2) + r, 2 + (r + 2) : 2 + (r + 2) + r], want)
