"""Typed run configs: nested dataclasses loaded from YAML plus ``key=value`` overrides.

One config file is one experiment. Loading is strict: an unknown key, a value of
the wrong type or a malformed override raises :class:`ConfigError` naming the key
(with a suggestion when it looks like a typo), so no setting is silently ignored.
The fully resolved config is written next to every run's results.

Facts about a key live on the key, as dataclass field metadata (see :func:`option`):

* ``help``: the one-line meaning shown by ``--help`` and ``show-config``;
* ``resume``: True if the key may change when a run is resumed (epochs, device, logging, paths);
* ``identity``: what the key identifies: ``"experiment"`` (the default: two runs that differ in it
  are different experiments), ``"run"`` (differs between runs of one experiment, e.g. the seed) or
  ``"none"`` (does not change any result: paths, device, progress bars).

Every list of such keys (what may change on resume, what groups runs into an experiment, what may
differ when a finished run is reused) is derived from this metadata by :func:`config_keys`.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin, get_type_hints

from .errors import ConfigError

T = TypeVar("T")

IDENTITIES = ("experiment", "run", "none")
_NO_DEFAULT: Any = dataclasses.MISSING


def option(
    default: Any = _NO_DEFAULT,
    help: str = "",
    *,
    factory: Any = None,
    resume: bool = False,
    identity: Literal["experiment", "run", "none"] = "experiment",
) -> Any:
    """A config field with its help text and the facts about it (see the module docstring)."""
    if identity not in IDENTITIES:
        raise ValueError(f"identity must be one of {IDENTITIES}, got {identity!r}")
    metadata = {"help": help, "resume": bool(resume), "identity": identity}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def config_keys(
    cls: type,
    *,
    resume: bool | None = None,
    identity: str | tuple[str, ...] | None = None,
    prefix: str = "",
) -> frozenset[str]:
    """Dotted keys of config class ``cls`` whose metadata matches (``None`` matches anything).

    ``config_keys(C, resume=True)``: keys that may change on resume;
    ``config_keys(C, identity=("run", "none"))``: keys that do not tell experiments apart.
    """
    wanted = (identity,) if isinstance(identity, str) else identity
    hints = _field_types(cls)
    keys: set[str] = set()
    for f in dataclasses.fields(cls):
        name = f"{prefix}{f.name}"
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            keys |= config_keys(tp, resume=resume, identity=identity, prefix=f"{name}.")
            continue
        if resume is not None and bool(f.metadata.get("resume", False)) != resume:
            continue
        if wanted is not None and f.metadata.get("identity", "experiment") not in wanted:
            continue
        keys.add(name)
    return frozenset(keys)


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (any depth)."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def config_changes(
    saved: dict[str, Any], current: dict[str, Any], allowed: frozenset[str] | set[str] = frozenset()
) -> list[str]:
    """``key: old in the checkpoint, new now`` for every dotted key outside ``allowed`` that differs.

    Both arguments are nested mappings (``to_dict`` of a config, or a loaded ``config.yaml``);
    the comparison is recursive, so a change at any depth is reported.
    """
    a, b = flatten(saved), flatten(current)
    return [
        f"{k}: {a.get(k, '<absent>')!r} in the checkpoint, {b.get(k, '<absent>')!r} now"
        for k in sorted(set(a) | set(b))
        if k not in allowed and a.get(k) != b.get(k)
    ]


def fill_defaults(cls: type, data: dict[str, Any]) -> dict[str, Any]:
    """``data`` (a nested mapping, e.g. a saved ``config.yaml``) with every key of ``cls`` it lacks set to its default.

    A run saved before a key existed then compares equal to a run that leaves the key at its default,
    so a resume check reports only real changes. Keys ``cls`` does not know are kept (and so reported);
    nothing is validated.
    """
    out = dict(data)
    hints = _field_types(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if f.name not in out:
            if f.default is not dataclasses.MISSING:
                out[f.name] = to_dict(f.default)
            elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
                out[f.name] = to_dict(f.default_factory())  # type: ignore[misc]
        elif dataclasses.is_dataclass(tp) and isinstance(out[f.name], dict):
            out[f.name] = fill_defaults(tp, out[f.name])
    return out


def _field_types(cls: type) -> dict[str, Any]:
    return get_type_hints(cls)


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check/convert one YAML value to the annotated type, or raise ConfigError naming ``key``."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(f"config key '{key}': {value!r} is not a valid {_type_name(tp)}")
    if origin is Literal:
        choices = get_args(tp)
        if value not in choices:
            raise ConfigError(f"config key '{key}': {value!r} is not one of {', '.join(map(repr, choices))}")
        return value
    if origin in (list, tuple):
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{key}': expected a list, got {value!r}")
        (item_type, *_rest) = get_args(tp) or (Any,)
        items = [_coerce(v, item_type, f"{key}[{i}]") for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}': expected a mapping, got {value!r}")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}': expected a section (mapping), got {value!r}")
        return from_dict(tp, value, prefix=f"{key}.")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"config key '{key}': expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"config key '{key}': expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML reads "1e-4" as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"config key '{key}': expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"config key '{key}': expected a string, got {value!r}")
    return value


def from_dict(cls: type[T], data: dict[str, Any], *, prefix: str = "") -> T:
    """Build dataclass ``cls`` from a nested mapping, rejecting unknown keys."""
    if not isinstance(data, dict):
        raise ConfigError(f"config section '{prefix.rstrip('.') or '<root>'}' must be a mapping, got {data!r}")
    hints = _field_types(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = [k for k in data if k not in fields]
    if unknown:
        key = unknown[0]
        close = difflib.get_close_matches(str(key), list(fields), n=1)
        hint = f" (did you mean '{prefix}{close[0]}'?)" if close else ""
        raise ConfigError(
            f"unknown config key '{prefix}{key}'{hint}; valid keys here: {', '.join(sorted(fields))}"
        )
    kwargs = {name: _coerce(value, hints[name], f"{prefix}{name}") for name, value in data.items()}
    try:
        obj = cls(**kwargs)
    except TypeError as err:
        raise ConfigError(f"config section '{prefix.rstrip('.') or '<root>'}': {err}") from None
    validate = getattr(obj, "validate", None)
    if callable(validate):
        validate()
    return obj


def to_dict(config: Any) -> dict[str, Any]:
    """Plain nested dict of a dataclass config (tuples become lists, for YAML)."""

    def convert(value: Any) -> Any:
        if dataclasses.is_dataclass(value):
            return {f.name: convert(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if isinstance(value, (list, tuple)):
            return [convert(v) for v in value]
        if isinstance(value, dict):
            return {k: convert(v) for k, v in value.items()}
        return value

    return convert(config)


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b.c=value`` -> (["a", "b", "c"], parsed YAML value)."""
    import yaml

    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key=value (e.g. optim.lr=0.1)")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as err:
        raise ConfigError(f"override {text!r}: value is not valid YAML ({err})") from None
    return key.split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Set each ``key=value`` on the nested mapping (sections are created as needed)."""
    for text in overrides:
        path, value = parse_override(text)
        node = data
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {text!r}: '{part}' is a value, not a section")
            node = child
        node[path[-1]] = value
    return data


def read_yaml(path: str | Path) -> dict[str, Any]:
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {path} is not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level")
    return data


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] | None = None) -> T:
    """Load ``cls`` from a YAML file (optional) with ``key=value`` overrides applied on top."""
    data = read_yaml(path) if path is not None else {}
    apply_overrides(data, list(overrides or []))
    return from_dict(cls, data)


def config_yaml(config: Any) -> str:
    """The resolved config as YAML text (what ``config.yaml`` of a run holds)."""
    import yaml

    return yaml.safe_dump(to_dict(config), sort_keys=False)


def describe(cls: type, prefix: str = "") -> list[str]:
    """One line per config key with its type and default: the reference shown by ``--help``."""
    lines: list[str] = []
    hints = _field_types(cls)
    for field in dataclasses.fields(cls):
        tp = hints[field.name]
        name = f"{prefix}{field.name}"
        if dataclasses.is_dataclass(tp):
            lines.extend(describe(tp, f"{name}."))
            continue
        if field.default is not dataclasses.MISSING:
            default = field.default
        elif field.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            default = field.default_factory()  # type: ignore[misc]
        else:
            default = "(required)"
        doc = field.metadata.get("help", "")
        lines.append(f"  {name} = {default!r}" + (f"  # {doc}" if doc else ""))
    return lines


def commented_yaml(cls: type, indent: str = "") -> str:
    """The defaults of config class ``cls`` as YAML, each key followed by its help as a comment.

    Sections (and sections inside them, e.g. ``model.lora``) become nested mappings."""
    import yaml

    lines: list[str] = []
    hints = _field_types(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            lines.append(f"{indent}{f.name}:")
            lines.append(commented_yaml(hints[f.name], indent + "  "))
            continue
        value = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        dumped = yaml.safe_dump({f.name: value}, default_flow_style=True, width=1000).strip()
        dumped = dumped[1:-1] if dumped.startswith("{") else dumped
        doc = f.metadata.get("help", "")
        lines.append(f"{indent}{dumped}" + (f"  # {doc}" if doc else ""))
    return "\n".join(lines)


PRECISIONS = ("float32", "bfloat16", "float16")
Precision = Literal["float32", "bfloat16", "float16"]


@dataclasses.dataclass
class RunSection:
    """The keys every pipeline's ``run`` section shares (seed, device, precision, output, logging, DDP).

    A pipeline's run section subclasses it and may re-declare a field to change its default or help
    (the image pipeline derives ``out_dir`` from the experiment when it is empty, the LM one does not).
    """

    seed: int = option(0, "seed of model initialisation, data order, augmentation and dropout", identity="run")
    device: str = option("auto", "auto | cpu | cuda | cuda:N | mps", resume=True, identity="none")
    precision: Precision = option(
        "float32",
        "autocast precision of the forward passes (float16 uses a GradScaler and needs a GPU; the loss "
        "math stays float32)",
    )
    out_dir: str = option("", "run folder", resume=True, identity="none")
    progress: bool = option(True, "tqdm progress bars (rank 0 only)", resume=True, identity="none")
    tensorboard: bool = option(
        True, "TensorBoard scalars in <out_dir>/tensorboard", resume=True, identity="none"
    )
    dist_timeout_s: float = option(
        1800.0, "timeout of collective operations under torchrun (seconds)", resume=True, identity="none"
    )

    def validate(self) -> None:
        if not self.dist_timeout_s > 0:
            raise ConfigError(f"config key 'run.dist_timeout_s' must be > 0, got {self.dist_timeout_s}")
