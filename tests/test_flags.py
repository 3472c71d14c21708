"""flags.py: flag names, the validation helpers, a parser built from a config's fields, YAML < flags."""

from __future__ import annotations  # flags.py reads each field's annotation as text, as every config module writes it

from dataclasses import dataclass, field

import pytest

from d3hr_ray.config import DistillConfig
from d3hr_ray.flags import ConfigError, build_parser, config_from_args, flag, require, require_positive_ints


@dataclass(frozen=True)
class Job:
    """A config of every field type the jobs use."""

    size: int = field(default=2, metadata={"help": "images a batch"})
    rate: float = field(default=0.5, metadata={"help": "a rate in (0, 1]"})
    name: str = field(default="run", metadata={"help": "the run's name"})
    weights: tuple[float, ...] = field(default=(1.0, 0.5), metadata={"help": "score weights"})
    tags: tuple[str, ...] = field(default=(), metadata={"help": "free-form tags"})
    limit: int | None = field(default=None, metadata={"help": "at most this many"})
    strict: bool = field(default=False, metadata={"help": "stop at the first bad input"})

    def __post_init__(self):
        require_positive_ints(self, "size")
        require(self, 0 < self.rate <= 1, "rate", "must be in (0, 1]")


@dataclass(frozen=True)
class Counts:
    """Fields validated by require_positive_ints, defaults valid."""

    batch_size: int = 1
    num_workers: int = 1


def _yaml(tmp_path, text: str) -> str:
    path = tmp_path / "job.yaml"
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize(
    "name,want", [("ipc", "--ipc"), ("batch_size", "--batch-size"), ("stats_per_class", "--stats-per-class")]
)
def test_flag_is_the_field_name_in_kebab_case(name, want):
    assert flag(name) == want


def test_require_names_the_flag_and_the_value():
    cfg = Job(size=3, name="x y")
    require(cfg, True, "name", "must be one word")  # ok: nothing raised
    with pytest.raises(ConfigError) as e:
        require(cfg, False, "name", "must be one word")
    assert str(e.value) == "--name must be one word, got 'x y'"
    assert isinstance(e.value, ValueError)  # callers that catch ValueError see configuration errors too


@pytest.mark.parametrize("value", [0, -1, True, False, 1.0, 2.5, "3", None])
def test_require_positive_ints_refuses_what_is_not_an_int_of_at_least_1(value):
    with pytest.raises(ConfigError) as e:
        require_positive_ints(Counts(num_workers=value), "batch_size", "num_workers")
    assert str(e.value) == f"--num-workers must be an integer >= 1, got {value!r}"


def test_require_positive_ints_accepts_ints_and_names_the_first_bad_field():
    require_positive_ints(Counts(batch_size=1, num_workers=10**9), "batch_size", "num_workers")
    with pytest.raises(ConfigError, match=r"^--batch-size must be an integer >= 1, got 0$"):
        require_positive_ints(Counts(batch_size=0, num_workers=0), "batch_size", "num_workers")
    require_positive_ints(Counts(batch_size=0), "num_workers")  # only the named fields are checked


def test_require_positive_ints_optional_lets_none_through_and_nothing_else():
    require_positive_ints(Counts(batch_size=None, num_workers=3), "batch_size", "num_workers", optional=True)
    with pytest.raises(ConfigError, match=r"^--num-workers must be an integer >= 1, got 0$"):
        require_positive_ints(Counts(batch_size=None, num_workers=0), "batch_size", "num_workers", optional=True)


def test_build_parser_parses_each_flag_by_its_fields_type():
    p = build_parser(Job)
    ns = p.parse_args(
        ["--size", "4", "--rate", "0.25", "--name", "a", "--weights", "1,2,3", "--tags", "x, y,", "--limit", "7"]
    )
    assert vars(ns) == {
        "config": None,
        "size": 4,
        "rate": 0.25,
        "name": "a",
        "weights": (1.0, 2.0, 3.0),
        "tags": ("x", "y"),  # blanks dropped
        "limit": 7,
    }
    assert type(ns.size) is int and all(type(w) is float for w in ns.weights)
    assert vars(p.parse_args([])) == {"config": None}  # a flag not given stays out: the YAML or the default decides


@pytest.mark.parametrize(
    "argv,want",
    [(["--strict"], True), (["--strict", "false"], False), (["--strict", "no"], False), (["--strict=on"], True)],
)
def test_a_bool_flag_without_a_value_means_true(argv, want):
    assert build_parser(Job).parse_args(argv).strict is want


@pytest.mark.parametrize(
    "argv",
    [["--size", "two"], ["--rate", "x"], ["--weights", "1,a"], ["--strict", "maybe"], ["--limit", "1.5"], ["--sise"]],
)
def test_a_value_argparse_cannot_read_exits_2_naming_the_flag(argv, capsys):
    with pytest.raises(SystemExit) as e:
        build_parser(Job, prog="job").parse_args(argv)
    assert e.value.code == 2
    assert argv[0] in capsys.readouterr().err


def test_help_shows_each_fields_help_and_default(capsys):
    with pytest.raises(SystemExit) as e:
        build_parser(Job, prog="job", description="Runs the job.").parse_args(["--help"])
    assert e.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert text.startswith("usage: job ") and "Runs the job." in text
    for part in [
        "--size SIZE images a batch (default: 2)",
        "--rate RATE a rate in (0, 1] (default: 0.5)",
        "--weights WEIGHTS score weights (default: 1.0,0.5)",
        "--limit LIMIT at most this many (default: None)",
        "--strict stop at the first bad input",  # a boolean shows bare: a bare flag means true
        "--config CONFIG YAML file",
    ]:
        assert part in text, part
    assert "[--strict]" in text and "[STRICT]" not in text


def test_help_says_a_default_once(capsys):
    """A help text that says its default gets no second "(default: None)"."""

    @dataclass(frozen=True)
    class Told:
        size: int | None = field(default=None, metadata={"help": "images a call (default: one class)"})
        root: str | None = field(default=None, metadata={"help": "checkpoints (default ~/ray_results)"})

    with pytest.raises(SystemExit):
        build_parser(Told, prog="job").parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--size SIZE images a call (default: one class) --root" in text
    assert text.endswith("--root ROOT checkpoints (default ~/ray_results)")
    assert text.count("default") == 2


def test_config_from_args_defaults_then_yaml_then_flags(tmp_path):
    assert config_from_args(Job, []) == Job()
    path = _yaml(tmp_path, "size: 8\nrate: 0.75\nweights: [3, 2]\ntags: [a, b]\nstrict: true\nlimit: null\n")
    assert config_from_args(Job, ["--config", path]) == Job(
        size=8, rate=0.75, weights=(3.0, 2.0), tags=("a", "b"), strict=True
    )
    got = config_from_args(Job, ["--config", path, "--size", "3", "--weights", "1", "--strict", "false"])
    assert got == Job(size=3, rate=0.75, weights=(1.0,), tags=("a", "b"), strict=False)  # the flags win
    # The flags' order does not matter: --config last still loses to the flags.
    assert config_from_args(Job, ["--size", "3", "--config", path]).size == 3
    # YAML values are read as their field's type: a string of numbers, yes/no, an int for a float.
    path = _yaml(tmp_path, "weights: '1,2'\nstrict: 'yes'\nrate: 1\nname: 7\n")
    got = config_from_args(Job, ["--config", path])
    assert got == Job(weights=(1.0, 2.0), strict=True, rate=1.0, name="7") and type(got.rate) is float


def test_config_from_args_validates_after_merging(tmp_path):
    with pytest.raises(ConfigError, match=r"^--size must be an integer >= 1, got 0$"):
        config_from_args(Job, ["--size", "0"])
    path = _yaml(tmp_path, "rate: 2.0\n")
    with pytest.raises(ConfigError, match=r"^--rate must be in \(0, 1\], got 2.0$"):
        config_from_args(Job, ["--config", path])
    assert config_from_args(Job, ["--config", path, "--rate", "1"]).rate == 1.0  # a flag can repair the YAML


def test_config_from_args_refuses_bad_yaml_naming_it(tmp_path):
    path = _yaml(tmp_path, "size: 3\nsise: 4\nnmae: x\n")
    with pytest.raises(ConfigError, match=r"--config .*job.yaml: unknown key\(s\) nmae, sise; keys are the flags"):
        config_from_args(Job, ["--config", path])
    with pytest.raises(ConfigError, match="cannot read 'many' as int"):
        config_from_args(Job, ["--config", _yaml(tmp_path, "size: many\n")])
    with pytest.raises(ConfigError, match=r"weights: cannot read \['a'\]"):
        config_from_args(Job, ["--config", _yaml(tmp_path, "weights: [a]\n")])
    with pytest.raises(ConfigError, match="expected a mapping"):
        config_from_args(Job, ["--config", _yaml(tmp_path, "- size\n- 3\n")])
    with pytest.raises(ConfigError, match="not valid YAML"):
        config_from_args(Job, ["--config", _yaml(tmp_path, "size: [3\n")])
    assert config_from_args(Job, ["--config", _yaml(tmp_path, "")]) == Job()  # an empty file is no keys


def test_a_config_without_a_required_value_is_a_config_error():
    @dataclass(frozen=True)
    class Needs:
        data: str = field(metadata={"help": "where the data is"})

    assert config_from_args(Needs, ["--data", "d"]) == Needs("d")
    with pytest.raises(ConfigError, match="data"):
        config_from_args(Needs, [])


# -- the same machinery on the distill job's config -------------------------------------------------


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


def test_yaml_errors(tmp_path):
    y = tmp_path / "bad.yaml"
    y.write_text("ipcs: 3\n")
    with pytest.raises(ConfigError, match="unknown key.*ipcs"):
        config_from_args(DistillConfig, ["--config", str(y)])
    with pytest.raises(ConfigError, match="cannot read"):
        config_from_args(DistillConfig, ["--config", str(tmp_path / "missing.yaml")])


def test_annotations_as_types_and_fields_without_help():
    """A config module without `from __future__ import annotations` has real types on its fields."""
    import dataclasses

    from d3hr_ray.flags import config_from_args as parse

    @dataclasses.dataclass(frozen=True)
    class Plain:
        n: int = 1
        name: str = dataclasses.field(default="x")  # no help text

    assert parse(Plain, ["--n", "4", "--name", "y"]) == Plain(4, "y")


def test_a_mistyped_flag_names_the_nearest_and_usage_is_one_line(capsys):
    from d3hr_ray.distill import main

    with pytest.raises(SystemExit) as e:
        main(["--ipcc", "5", "--output", "o", "--guidence", "3"])
    assert e.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith("usage: python -m d3hr_ray.distill ") and "--help" in lines[0]
    assert lines[1] == "error: unrecognized arguments: --ipcc 5 --guidence 3; did you mean --ipc or --guidance?"
    # Nothing near: no guess, still two lines (argparse's own usage lists all of DistillConfig's flags).
    with pytest.raises(SystemExit):
        build_parser(Job, prog="job").parse_args(["--zzzzzz"])
    assert capsys.readouterr().err.splitlines()[1:] == ["error: unrecognized arguments: --zzzzzz"]
