"""DistillConfig: defaults, --actor-resources, one-line errors naming the flag (YAML and flags: test_flags.py)."""

import pytest

from d3hr_ray.config import DistillConfig
from d3hr_ray.distill import main
from d3hr_ray.flags import ConfigError, config_from_args


def test_defaults_are_the_embedded_run_at_the_reference_settings():
    cfg = config_from_args(DistillConfig, [])
    assert cfg == DistillConfig()  # the flag parser adds no default of its own
    assert cfg.data == "digits"  # the embedded run: no flag, no download
    # docs/method.md: the reference inverts to t = 600 of T = 1000 on a 50-step DDIM grid, and generation starts there.
    assert cfg.steps == 50 and cfg.inversion_step * (1000 // cfg.steps) == 600
    assert cfg.generation_start == cfg.inversion_step
    assert cfg.score_weights == (1.0, 1.0, 0.1)  # docs/method.md, stage 4: the reference code's weights


def test_actor_resources_become_rays_resources_argument(tmp_path):
    assert DistillConfig().actor_resource_map == {}
    assert config_from_args(DistillConfig, ["--actor-resources", "ondemand=1, slot=0.5"]).actor_resource_map == {
        "ondemand": 1.0,
        "slot": 0.5,
    }
    y = tmp_path / "job.yaml"
    y.write_text("actor_resources: [ondemand=2]\n")
    assert config_from_args(DistillConfig, ["--config", str(y)]).actor_resource_map == {"ondemand": 2.0}


def test_compile_is_auto_by_default_and_a_bare_flag_means_on(tmp_path):
    assert DistillConfig().compile == "auto"
    assert config_from_args(DistillConfig, ["--compile"]).compile == "on"  # as the flag meant before auto
    assert config_from_args(DistillConfig, ["--compile", "off"]).compile == "off"
    y = tmp_path / "job.yaml"
    for text, want in (
        ("compile: true", "on"),
        ("compile: off", "off"),
        ("compile: on", "on"),
        ("compile: auto", "auto"),
    ):
        y.write_text(text + "\n")  # YAML 1.1 reads on/off/true as booleans
        assert config_from_args(DistillConfig, ["--config", str(y)]).compile == want, text


@pytest.mark.parametrize(
    "argv,flag",
    [
        (["--ipc", "0"], "--ipc"),
        (["--inversion-step", "50"], "--inversion-step"),
        (["--encode", "median"], "--encode"),
        (["--score-weights", "1,1"], "--score-weights"),
        (["--dtype", "int8"], "--dtype"),
        (["--stats-only", "--from-stats", "x.safetensors"], "--stats-only"),
        (["--actor-resources", "ondemand"], "--actor-resources"),
        (["--actor-resources", "ondemand=0"], "--actor-resources"),
        (["--actor-resources", "GPU=1"], "--actor-resources"),
        (["--actor-resources", "ondemand=x"], "--actor-resources"),
        (["--candidates-from", "neighbours"], "--candidates-from"),
        (["--candidates-from", "real"], "--candidates-from"),  # no latents kept, no --from-stats
        (["--candidates-from", "real", "--keep-latents", "--latents", "noise"], "--candidates-from"),
        (["--candidates-from", "real", "--keep-latents", "--stats-only"], "--candidates-from"),
        (["--keep-latents", "--from-stats", "x.safetensors"], "--keep-latents"),
        (["--stats-per-class", "1"], "--stats-per-class"),
        (["--stats-per-class", "10", "--from-stats", "x.safetensors"], "--stats-per-class"),
        (["--compile", "sometimes"], "--compile"),
        (["--images-per-call", "0"], "--images-per-call"),
    ],
)
def test_invalid_values_name_the_flag(argv, flag, capsys):
    with pytest.raises(ConfigError, match=flag):
        config_from_args(DistillConfig, argv)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and flag in err and len(err.splitlines()) == 1 and "Traceback" not in err
