"""DistillConfig: defaults, YAML + flags precedence, one-line errors that name the flag."""

import pytest

from d3hr_ray.config import DistillConfig
from d3hr_ray.distill import main
from d3hr_ray.flags import ConfigError, config_from_args


def test_defaults_are_the_embedded_run():
    cfg = config_from_args(DistillConfig, [])
    assert cfg == DistillConfig()
    assert (cfg.data, cfg.ipc, cfg.steps, cfg.inversion_step, cfg.guidance) == ("digits", 10, 50, 30, 4.0)
    assert cfg.generation_start == 30 and cfg.score_weights == (1.0, 1.0, 0.1)


def test_yaml_then_flags(tmp_path):
    y = tmp_path / "job.yaml"
    y.write_text("ipc: 50\nscore_weights: [1, 1, 0.5]\nclasses: [cat, dog]\nencode: mean\nstrict: true\n")
    cfg = config_from_args(DistillConfig, ["--config", str(y), "--ipc", "20", "--start-step", "31", "--steps", "50"])
    assert cfg.ipc == 20  # the flag wins
    assert cfg.score_weights == (1.0, 1.0, 0.5) and cfg.classes == ("cat", "dog")
    assert cfg.encode == "mean" and cfg.strict is True and cfg.generation_start == 31
    assert config_from_args(DistillConfig, ["--score-weights", "2,1,0", "--classes", "a,b"]).score_weights == (
        2.0,
        1.0,
        0.0,
    )


def test_actor_resources_become_rays_resources_argument(tmp_path):
    assert DistillConfig().actor_resource_map == {}
    assert config_from_args(DistillConfig, ["--actor-resources", "ondemand=1, slot=0.5"]).actor_resource_map == {
        "ondemand": 1.0,
        "slot": 0.5,
    }
    y = tmp_path / "job.yaml"
    y.write_text("actor_resources: [ondemand=2]\n")
    assert config_from_args(DistillConfig, ["--config", str(y)]).actor_resource_map == {"ondemand": 2.0}


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
    ],
)
def test_invalid_values_name_the_flag(argv, flag, capsys):
    with pytest.raises(ConfigError, match=flag):
        config_from_args(DistillConfig, argv)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and flag in err and len(err.splitlines()) == 1 and "Traceback" not in err


def test_yaml_errors(tmp_path):
    y = tmp_path / "bad.yaml"
    y.write_text("ipcs: 3\n")
    with pytest.raises(ConfigError, match="unknown key.*ipcs"):
        config_from_args(DistillConfig, ["--config", str(y)])
    with pytest.raises(ConfigError, match="cannot read"):
        config_from_args(DistillConfig, ["--config", str(tmp_path / "missing.yaml")])
