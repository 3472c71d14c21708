"""load_pipeline from a folder, from s3:// on moto's standalone server, and its errors."""

import json

import pytest
import torch

from d3hr_ray import ModelSpec, load_pipeline
from tests.models.conftest import upload


def _same_weights(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_folder_round_trip(saved):
    pipe, folder = saved
    back = load_pipeline(folder)
    assert _same_weights(back.transformer, pipe.transformer) and _same_weights(back.vae, pipe.vae)
    assert back.labels == {"ant": 0, "bee": 1, "cow": 2}
    assert not back.transformer.training
    assert ModelSpec.from_pipeline(back).null_class == 3
    half = load_pipeline(str(folder), dtype=torch.bfloat16)
    assert half.transformer.dtype == torch.bfloat16


def test_s3_load_and_etag_cache(saved, s3_env, tmp_path):
    pipe, folder = saved
    s3_env.create_bucket(Bucket="models")
    upload(s3_env, folder, "models", "dits/tiny")
    back = load_pipeline("s3://models/dits/tiny")
    assert _same_weights(back.transformer, pipe.transformer)
    cache = tmp_path / "cache" / "s3"
    assert len(list(cache.iterdir())) == 1
    load_pipeline("s3://models/dits/tiny/")  # unchanged objects: served from the cache
    assert len(list(cache.iterdir())) == 1
    # A changed object (new ETag) is fetched again.
    cfg = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    cfg["beta_end"] = 0.025
    s3_env.put_object(Bucket="models", Key="dits/tiny/scheduler/scheduler_config.json", Body=json.dumps(cfg).encode())
    changed = load_pipeline("s3://models/dits/tiny")
    assert changed.scheduler.config.beta_end == 0.025
    assert len([p for p in cache.iterdir() if not p.name.startswith(".")]) == 2


@pytest.fixture
def diffusers_log():
    """Everything diffusers logs (its loggers do not propagate to the root, so caplog misses them)."""
    import logging

    records = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    handler = Keep(level=logging.WARNING)
    logging.getLogger("diffusers").addHandler(handler)
    yield records
    logging.getLogger("diffusers").removeHandler(handler)


def test_loads_without_warnings_and_id2label_survives_a_resave(saved, diffusers_log, tmp_path):
    from diffusers import DiTPipeline

    _, folder = saved
    assert json.loads((folder / "model_index.json").read_text())["id2label"] == {
        "0": "ant",
        "1": "bee",
        "2": "cow",
    }  # JSON: str keys
    DiTPipeline.from_pretrained(folder)  # diffusers alone checks the str keys against dict[int, str] ...
    assert any("Expected types for id2label" in m for m in diffusers_log)
    diffusers_log.clear()
    back = load_pipeline(folder)  # ... load_pipeline hands them over as ints
    assert diffusers_log == []  # nor the "pip install accelerate" block (loader_options)
    assert back.labels == {"ant": 0, "bee": 1, "cow": 2}
    back.save_pretrained(tmp_path / "again")  # a loaded pipeline keeps its names when saved again
    assert json.loads((tmp_path / "again" / "model_index.json").read_text())["id2label"] == {
        "0": "ant",
        "1": "bee",
        "2": "cow",
    }
    assert load_pipeline(tmp_path / "again").labels == back.labels


def test_loads_without_a_progress_bar_and_keeps_the_callers_setting(saved, capfd):
    """Every model actor loads once: no "Loading pipeline components" bar from load_pipeline, while diffusers' own
    from_pretrained of the same folder draws one; the process's bar setting is left as it was."""
    from diffusers import DiTPipeline
    from diffusers.utils import logging as diffusers_logging

    _, folder = saved
    assert diffusers_logging.is_progress_bar_enabled()
    DiTPipeline.from_pretrained(folder)
    assert "Loading pipeline components" in capfd.readouterr().err
    load_pipeline(folder)
    assert "Loading pipeline components" not in capfd.readouterr().err
    assert diffusers_logging.is_progress_bar_enabled()
    diffusers_logging.disable_progress_bar()
    try:
        load_pipeline(folder)
        assert not diffusers_logging.is_progress_bar_enabled()  # a caller that turned bars off keeps them off
    finally:
        diffusers_logging.enable_progress_bar()
