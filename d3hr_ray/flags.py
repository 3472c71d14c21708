"""Flags and YAML for every job: one frozen, validated config dataclass per job, parsed in one place.

Precedence: the dataclass's defaults < `--config file.yaml` (the same keys, snake_case) < flags.
Every validation message names the flag (`require`), so the command line can print it as one line.
A flag's type comes from its field's annotation; its help text from the field's `metadata["help"]`.
Nothing here imports torch: a config parses (and fails) before any model code loads.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import yaml

__all__ = ["ConfigError", "build_parser", "config_from_args", "flag", "require", "require_positive_ints"]

# A job's config: a frozen dataclass whose fields are its flags.
C = TypeVar("C")
# A help text that already says its flag's default ("(default: ...)", "default ~/ray_results").
_SAYS_DEFAULT = re.compile(r"\bdefault\b")


class ConfigError(ValueError):
    """A user-facing configuration error; the message names the flag."""


def flag(name: str) -> str:
    """A field name as its flag: batch_size -> --batch-size."""
    return "--" + name.replace("_", "-")


def require(cfg: object, ok: bool, name: str, what: str) -> None:
    """Raise ConfigError("--flag-name <what>, got <value>") unless ok."""
    if not ok:
        raise ConfigError(f"{flag(name)} {what}, got {getattr(cfg, name)!r}")


def require_positive_ints(cfg: object, *names: str, optional: bool = False) -> None:
    """Each named field is an int >= 1, or None when `optional` (ConfigError naming the first that is not)."""
    for name in names:
        value = getattr(cfg, name)
        if optional and value is None:
            continue
        require(
            cfg, isinstance(value, int) and not isinstance(value, bool) and value >= 1, name, "must be an integer >= 1"
        )


def _csv_floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in str(text).split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _csv_strs(text: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in str(text).split(",") if x.strip())


def _bool(text: object) -> bool:
    if isinstance(text, bool):
        return text
    if str(text).lower() in ("1", "true", "yes", "on"):
        return True
    if str(text).lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _field_parser(f: dataclasses.Field) -> Callable[[str], Any]:
    """How a flag's text becomes its field's value, from the field's annotation (text, or a type)."""
    t = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", None) or str(f.type)
    t = t.replace(" ", "").replace("typing.", "")
    if t.startswith("tuple[float"):
        return _csv_floats
    if t.startswith("tuple[str"):
        return _csv_strs
    if t in ("bool", "bool|None"):
        return _bool
    parsers = {"int": int, "float": float, "str": str, "int|None": int, "float|None": float, "str|None": str}
    if t not in parsers:
        raise TypeError(f"config field {f.name}: no flag parser for its type {t!r}")
    return parsers[t]


class _Help(argparse.RawDescriptionHelpFormatter):
    """A boolean flag shows bare, `[--strict]` (a bare flag means true; `--strict false` still parses)."""

    def _format_args(self, action: argparse.Action, default_metavar: str) -> str:
        return "" if action.type is _bool else super()._format_args(action, default_metavar)

    def _format_action_invocation(self, action: argparse.Action) -> str:
        return super()._format_action_invocation(action).rstrip()  # "--strict ", its value left out


def _help(f: dataclasses.Field) -> str:
    """A field's help text, its default added unless the text says it ("default: the source images' size")."""
    text = f.metadata.get("help", "")
    if _SAYS_DEFAULT.search(text):
        return text
    shown = ",".join(map(str, f.default)) if isinstance(f.default, tuple) else f.default
    return f"{text} (default: {shown})"


class _Parser(argparse.ArgumentParser):
    """argparse with a short refusal: one usage line (not every flag) and the error, with the nearest flag named
    for a mistyped one ("did you mean --ipc?"); exit 2 as argparse's own."""

    def error(self, message: str) -> NoReturn:
        words = re.findall(r"--[\w-]+", message)
        known = [o for o in self._option_string_actions if o.startswith("--")]
        guesses = [m for w in words if w not in known for m in difflib.get_close_matches(w, known, n=1, cutoff=0.6)]
        hint = f"; did you mean {' or '.join(dict.fromkeys(guesses))}?" if guesses else ""
        self.exit(
            2, f"usage: {self.prog} [--flag VALUE ...] ({self.prog} --help lists the flags)\nerror: {message}{hint}\n"
        )


def build_parser(cls: type, prog: str | None = None, description: str | None = None) -> argparse.ArgumentParser:
    """Flags for every field of the config dataclass `cls`, plus --config."""
    p = _Parser(prog=prog, description=description, formatter_class=_Help)
    p.add_argument("--config", help="YAML file with the same keys (snake_case); flags override it")
    for f in dataclasses.fields(cls):
        kind = _field_parser(f)
        if kind is _bool:
            p.add_argument(
                flag(f.name),
                nargs="?",
                const=True,
                type=_bool,
                default=argparse.SUPPRESS,
                help=f.metadata.get("help", ""),
            )
        elif "const" in f.metadata:  # a choice whose bare flag means one value (--compile means --compile on)
            p.add_argument(
                flag(f.name),
                nargs="?",
                const=f.metadata["const"],
                type=kind,
                default=argparse.SUPPRESS,
                metavar=f.name.upper(),
                help=_help(f),
            )
        else:
            p.add_argument(
                flag(f.name),
                type=kind,
                default=argparse.SUPPRESS,
                metavar=f.name.upper(),
                help=_help(f),
            )
    return p


def _from_yaml(path: str, cls: type) -> dict[str, object]:
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise ConfigError(f"--config {path}: cannot read it ({e.strerror})") from None
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"--config {path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"--config {path}: expected a mapping of keys to values")
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ConfigError(f"--config {path}: unknown key(s) {', '.join(unknown)}; keys are the flags in snake_case")
    out: dict[str, object] = {}
    for k, v in data.items():
        if v is None:
            out[k] = None
            continue
        parse = _field_parser(known[k])
        if isinstance(v, bool) and "const" in known[k].metadata:  # YAML reads on/off/true/false as booleans
            out[k] = known[k].metadata["const"] if v else known[k].metadata["false"]
            continue
        try:
            if parse is _csv_floats and isinstance(v, list):
                out[k] = tuple(float(x) for x in v)
            elif parse is _csv_strs and isinstance(v, list):
                out[k] = tuple(str(x) for x in v)
            else:
                out[k] = parse(v)
        except (ValueError, TypeError, argparse.ArgumentTypeError):
            raise ConfigError(f"--config {path}: {k}: cannot read {v!r} as {known[k].type}") from None
    return out


def config_from_args(
    cls: type[C], argv: list[str] | None = None, *, prog: str | None = None, description: str | None = None
) -> C:
    """Parse flags (and --config YAML) into a validated `cls` (a config dataclass). Raises ConfigError.

    argparse's own usage errors (an unknown flag, a value of the wrong type) exit 2, as ConfigError does in `cli`.
    """
    ns = vars(build_parser(cls, prog, description).parse_args(argv))
    path = ns.pop("config", None)
    values = _from_yaml(path, cls) if path else {}
    values.update(ns)
    try:
        return cls(**values)
    except TypeError as e:
        raise ConfigError(str(e)) from None
