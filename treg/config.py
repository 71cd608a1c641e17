"""Configs are dataclasses loaded from YAML; an unknown, missing, mistyped or out-of-range key is an error, never
ignored. A field declares its valid range once, next to itself, with `bounded` (numbers) or `one_of` (names);
`build` checks every field in one place, and every float must be finite."""
import argparse
import dataclasses
import math
import typing
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent  # the repository: configs/, samples/, solve.py
CONFIGS = ROOT / "configs"
SAMPLES = ROOT / "samples"
DEFAULT_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"  # the official runwayml/... id was withdrawn


class ConfigError(ValueError):
    """A config problem, reported to the user as one line."""


def bounded(default=dataclasses.MISSING, low=None, high=None, *, low_open=False):
    """A dataclass field whose value must lie in [low, high] ((low, high] with `low_open`); None = unbounded.
    Without a default the field is required."""
    return dataclasses.field(default=default, metadata={"bounds": (low, high, low_open)})


def one_of(default, choices):
    """A dataclass field whose value must be one of `choices` (any container of names)."""
    return dataclasses.field(default=default, metadata={"choices": choices})


def check_value(value, field, source):
    """ConfigError unless `value` is finite and within the field's declared bounds or choices."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{source}: '{field.name}' must be a finite number, got {value}")
    low, high, low_open = field.metadata.get("bounds", (None, None, False))
    if value is not None and isinstance(value, (int, float)) and (
            (low is not None and (value <= low if low_open else value < low)) or (high is not None and value > high)):
        lo = "-∞" if low is None else f"{low:g}"
        hi = "∞" if high is None else f"{high:g}"
        raise ConfigError(f"{source}: '{field.name}' must be in {'(' if low_open else '['}{lo}, {hi}], got {value:g}")
    choices = field.metadata.get("choices")
    if choices is not None and value not in choices:
        raise ConfigError(f"{source}: '{field.name}' must be one of {', '.join(map(str, choices))}, got {value!r}")


@dataclasses.dataclass
class TaskConfig:
    """A degradation task: y = A(x) + noise_scale·n, with x a (B,3,image_size,image_size) image in [-1,1]."""
    operator: str                                     # a key of treg.operators.OPERATORS
    params: dict                                      # that operator's keyword arguments
    noise_scale: float = bounded(low=0.0, high=10.0)  # measurement noise std, in [-1,1] pixel units
    image_size: int = bounded(low=8, high=8192)       # images are resized (shorter side) and centre-cropped to this


def read_yaml(path):
    """A YAML mapping from `path`, or a ConfigError naming the file and the problem."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise ConfigError(f"cannot read config {path}: {err.strerror or err}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"config {path} is not UTF-8 text") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"malformed YAML in {path}{where}: {getattr(err, 'problem', None) or err}") from None
    except (ValueError, RecursionError) as err:  # e.g. an integer of 5,000 digits, or nesting thousands deep
        raise ConfigError(f"unreadable YAML in {path}: {str(err).split(';')[0]}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of keys to values")
    return data


def _coerce(value, kind, key, source):
    """YAML 1.1 reads `1e-4` as a string and `5` as an int; accept both where a float is meant."""
    if kind is float and isinstance(value, (int, str)) and not isinstance(value, bool):
        try:
            return float(value)
        except (ValueError, OverflowError):
            pass
    if typing.get_origin(kind) is typing.Union or type(kind).__name__ == "UnionType":
        options = [k for k in typing.get_args(kind) if k is not type(None)]
        return value if value is None else _coerce(value, options[0], key, source)
    if (kind in (int, float, bool, str, dict) and not isinstance(value, kind)
            or (kind is int and isinstance(value, bool))):
        raise ConfigError(f"{source}: '{key}' must be {kind.__name__}, got {value!r}")
    return value


def build(cls, data, source):
    """cls(**data) with unknown keys, missing keys, wrong types and out-of-range values reported as one line."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    bad_keys = [k for k in data if not isinstance(k, str)]
    if bad_keys:
        raise ConfigError(f"{source}: keys must be names, got {bad_keys[0]!r}")
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"{source}: unknown key(s) {', '.join(unknown)}; valid keys: {', '.join(fields)}")
    missing = [name for name, f in fields.items() if name not in data
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ConfigError(f"{source}: missing key(s) {', '.join(missing)}")
    values = {k: _coerce(v, hints[k], k, source) for k, v in data.items()}
    for key, value in values.items():
        check_value(value, fields[key], source)
    return cls(**values)


def load_task(path, image_size=None):
    """The TaskConfig in `path`; `image_size` (the CLI flag) overrides the file's."""
    data = read_yaml(path)
    if image_size is not None:
        data["image_size"] = image_size
    return build(TaskConfig, data, str(path))


def load_solver(path, solvers, overrides=None, strict=True):
    """(name, config) from a solver YAML whose `solver:` key names an entry of `solvers`; `overrides` are
    CLI values (None = not given) applied on top of the file. A flag the solver has no field for is an error
    when `strict`, and is skipped otherwise (compare mode applies shared flags to the solvers that have them)."""
    data = read_yaml(path)
    name = data.pop("solver", None)
    if not isinstance(name, str) or name not in solvers:
        raise ConfigError(f"{path}: 'solver' must be one of {', '.join(solvers)}, got {name!r}")
    cls = solvers[name][1]
    names = {f.name for f in dataclasses.fields(cls)}
    for key, value in (overrides or {}).items():
        if value is None:
            continue
        if key not in names:
            if not strict:
                continue
            raise ConfigError(f"--{key} does not apply to solver '{name}' (its settings: {', '.join(names)})")
        data[key] = value
    return name, build(cls, data, str(path))


def parse_set(text):
    """A --set SOLVER.KEY=VALUE argument as (SOLVER.KEY, value), the value read as YAML."""
    key, sep, value = text.partition("=")
    if not sep or "." not in key:
        raise argparse.ArgumentTypeError(f"--set expects SOLVER.KEY=VALUE, got {text!r}")
    return key, yaml.safe_load(value)
