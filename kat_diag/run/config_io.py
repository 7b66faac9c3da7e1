"""Config files: load JSON/YAML into the frozen config dataclasses, merge with command-line options.

`train`, `record` and `study` take `--config FILE` with the same keys as the `config.json` a run
writes (nested sections such as `sampling:` and `kat:`; a partial file is fine). Precedence:
options given on the command line > the file > the command's defaults. Which options were *given*
is asked of click (`ctx.get_parameter_source`), not guessed from values, so `--steps 50` overrides a
file's `steps: 10` even though 50 is the default.

A config file is untrusted input: it is parsed with `json.loads` / `yaml.safe_load` only (no
object tags), every key must name a field of the dataclass (unknown or renamed keys are an error
naming the key and the file), and values are type-checked before the dataclass validates them.

`resolve_options` is the one call a command makes; `resume_overrides` checks a resumed run's
options against its `config.json`.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

C = TypeVar("C")

# Keys a run writes next to its settings in config.json that are facts about the run, not settings.
RECORDED_FACTS = frozenset({"world_size"})
# Keys renamed since an earlier version: old dotted path -> new dotted path (for a clear message).
RENAMED: dict[str, str] = {}


class ConfigError(ValueError):
    """A config file or a config value that cannot be used (one-line message naming the key)."""


# ---------------------------------------------------------------------------------------------
# Reading and building


def read_config_file(path: str | Path, option: str = "--config") -> dict[str, Any]:
    """The mapping in a JSON or YAML file (.json -> JSON; .yaml/.yml -> YAML; else JSON, then YAML).

    Strict where a silent reading would be wrong: a key repeated in one mapping is an error (JSON
    and YAML parsers keep the last value without a word), and so is text that is not UTF-8 (the
    message gives the line). YAML floats written without a dot (`lr: 1e-4`, as Hugging Face configs
    write them) are read as numbers, not as the strings YAML 1.1 makes of them.
    """
    p = Path(path)
    if p.is_dir():
        raise ConfigError(f"{option} {p}: is a directory, not a JSON or YAML file")
    try:
        raw = p.read_bytes()
    except OSError as e:
        raise ConfigError(f"{option} {p}: cannot read ({e.strerror or e})") from e
    text = decode_utf8(raw, f"{option} {p}")
    suffix = p.suffix.lower()
    data: Any
    try:
        if suffix == ".json":
            data = strict_json_loads(text)
        elif suffix in (".yaml", ".yml"):
            data = _yaml(text)
        else:
            try:
                data = strict_json_loads(text)
            except json.JSONDecodeError:
                data = _yaml(text)
    except DuplicateKeyError as e:
        raise ConfigError(f"{option} {p}: {e}") from e
    except (json.JSONDecodeError, ValueError) as e:
        raise ConfigError(f"{option} {p}: not valid {'JSON' if suffix == '.json' else 'JSON or YAML'} "
                          f"({str(e).splitlines()[0]})") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{option} {p}: expected a mapping of settings at the top, got {type(data).__name__}")
    return data


class DuplicateKeyError(ValueError):
    """A key given twice in one mapping of a config file."""


def decode_utf8(raw: bytes, what: str) -> str:
    """raw as UTF-8 text; else ValueError naming `what` and the line and byte that are not UTF-8."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise ConfigError(f"{what}: line {line} is not UTF-8 text (byte 0x{raw[e.start]:02x}); "
                          "save the file as UTF-8") from None


def _unique_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise DuplicateKeyError(f"key '{key}' is given twice in one mapping (which one is meant?)")
        out[key] = value
    return out


def strict_json_loads(text: str) -> Any:
    """json.loads that refuses a key repeated in one object (json keeps the last one silently)."""
    return json.loads(text, object_pairs_hook=_unique_pairs)


def _yaml_loader() -> type:
    """yaml.SafeLoader (plain data only, never Python objects) that refuses repeated keys and reads
    exponent floats without a dot (1e-4) as floats."""
    import re

    import yaml

    class StrictLoader(yaml.SafeLoader):
        def construct_mapping(self, node: Any, deep: bool = False) -> Any:
            seen: set[Any] = set()
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=deep)
                if key in seen:
                    raise DuplicateKeyError(f"key '{key}' is given twice in one mapping "
                                            f"(line {key_node.start_mark.line + 1}; which one is meant?)")
                seen.add(key)
            return super().construct_mapping(node, deep=deep)

    StrictLoader.add_implicit_resolver(
        "tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
        list("-+0123456789"))
    return StrictLoader


def _yaml(text: str) -> Any:
    import yaml

    try:
        return yaml.load(text, Loader=_yaml_loader())  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as e:
        raise ValueError(" ".join(str(e).split())) from e


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _check_type(value: Any, hint: Any, where: str) -> Any:
    """Value checked (and lists turned into tuples) against a simple type hint; raises ConfigError."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _check_type(value, arg, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{where}: bad value {value!r}")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        inner = typing.get_args(hint)
        item = inner[0] if inner else Any
        return tuple(_check_type(v, item, f"{where}[{i}]") for i, v in enumerate(value))
    if hint is Any:
        return value
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if dataclasses.is_dataclass(hint):
        if isinstance(value, hint):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a mapping of {hint.__name__} settings, got {value!r}")
        return build(hint, value, where=where)
    ok = {
        bool: lambda v: isinstance(v, bool),
        int: lambda v: isinstance(v, int) and not isinstance(v, bool),
        float: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
        str: lambda v: isinstance(v, str),
    }.get(hint)
    if ok is None:
        return value
    if not ok(value):
        raise ConfigError(f"{where}: expected {hint.__name__}, got {value!r}")
    return float(value) if hint is float else value


def build(cls: type[C], data: Mapping[str, Any], *, where: str = "config", base: C | None = None) -> C:
    """`cls` from a (possibly partial) mapping; missing keys come from `base`, else the defaults.

    Unknown keys, renamed keys and values of the wrong type raise ConfigError naming the dotted key;
    the dataclass's own validation (ranges, names) runs last and its ValueError names the field.
    """
    hints = _hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    data = _legacy(cls, data)
    values: dict[str, Any] = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where != "config" else key
        if key in RECORDED_FACTS and where == "config":
            continue
        if key not in fields:
            if path in RENAMED:
                raise ConfigError(f"key '{path}' was renamed to '{RENAMED[path]}'; rename it")
            raise ConfigError(f"unknown key '{path}' (not a {cls.__name__} setting; known: "
                              f"{', '.join(sorted(fields))})")
        hint = hints[key]
        if dataclasses.is_dataclass(hint) and isinstance(value, Mapping):
            inner_base = getattr(base, key) if base is not None else None
            values[key] = build(hint, value, where=path, base=inner_base)
        else:
            values[key] = _check_type(value, hint, path)
    try:
        if base is not None:
            return dataclasses.replace(base, **values)
        return cls(**values)
    except TypeError as e:  # a required field is missing
        raise ConfigError(str(e)) from e


def _legacy(cls: type, data: Mapping[str, Any]) -> Mapping[str, Any]:
    """Old key names of a section mapped to today's (configs written by earlier versions): a config
    class that renamed keys says how with a static `upgrade_dict(dict) -> dict` (e.g. KATConfig)."""
    upgrade = getattr(cls, "upgrade_dict", None)
    return upgrade(dict(data)) if upgrade is not None else data


def load(cls: type[C], path: str | Path, *, base: C | None = None) -> C:
    """`cls` from a JSON/YAML file (see `build`); errors name the file."""
    data = read_config_file(path)
    try:
        return build(cls, data, base=base)
    except ConfigError as e:
        raise ConfigError(f"--config {path}: {e}") from None


def as_dict(cfg: Any) -> dict[str, Any]:
    """The config as plain JSON-ready data (tuples become lists), like a run's config.json."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def dump(cfg: Any) -> str:
    """The resolved config as indented JSON (what `--print-config` prints)."""
    return json.dumps(as_dict(cfg), indent=2)


# ---------------------------------------------------------------------------------------------
# Command-line options -> config fields


def _get(d: Mapping[str, Any], path: str) -> Any:
    for part in path.split("."):
        d = d[part]
    return d


def _set(d: dict[str, Any], path: str, value: Any) -> None:
    parts = path.split(".")
    for part in parts[:-1]:
        d = d[part]
    d[parts[-1]] = value


def leaf_paths(cls: type) -> list[str]:
    """Dotted names of every leaf field of a (nested) config dataclass."""
    out = []
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint):
            out += [f"{f.name}.{p}" for p in leaf_paths(hint)]
        else:
            out.append(f.name)
    return out


def option_paths(params: Iterable[str], cls: type, *, aliases: Mapping[str, str] | None = None,
                 not_config: Iterable[str] = ()) -> dict[str, str]:
    """Map each command parameter to the config field it sets.

    A parameter maps to `aliases[name]` if given, else to the top-level field of that name, else to
    the one nested field of that name (e.g. `window` -> `kat.window`). Parameters in `not_config`
    (--config, --resume, ...) map to nothing. Any other parameter is a programming error, reported
    at once so that a new option cannot silently escape config files and resume checks.
    """
    aliases = dict(aliases or {})
    leaves = leaf_paths(cls)
    top = {p for p in leaves if "." not in p}
    skip = set(not_config)
    out: dict[str, str] = {}
    for name in params:
        if name in skip:
            continue
        if name in aliases:
            out[name] = aliases[name]
        elif name in top:
            out[name] = name
        else:
            nested = [p for p in leaves if p.endswith("." + name)]
            if len(nested) != 1:
                raise RuntimeError(f"option {name!r} maps to no single {cls.__name__} field "
                                   f"(candidates: {nested}); add it to the command's aliases or not_config")
            out[name] = nested[0]
    return out


def explicit_params(ctx: Any) -> set[str]:
    """Names of the parameters given on the command line (or through an environment variable)."""
    given = {"COMMANDLINE", "ENVIRONMENT", "PROMPT"}  # by name: typer vendors its own click

    def source(name: str) -> str:
        src = ctx.get_parameter_source(name)
        return getattr(src, "name", "")

    return {p.name for p in ctx.command.params if p.name and source(p.name) in given}


def option_name(param: str) -> str:
    return "--" + param.replace("_", "-")


def resolve_options(ctx: Any, cls: type[C], cli_cfg: C, *, config_file: str | Path | None = None,
                    aliases: Mapping[str, str] | None = None, not_config: Iterable[str] = (),
                    resume_from: str | Path | None = None,
                    resume_mutable: Iterable[str] = (), per_invocation: Iterable[str] = ()) -> C:
    """The config a command runs with: its defaults, under `--config FILE`, under the given options.

    `cli_cfg` is the config built from every option's value (defaults included). With
    `resume_from` (a run's config.json) that file is the base instead, and a given option (or a
    `--config` value) that differs from it is an error naming both values unless its field is in
    `resume_mutable`. Fields in `per_invocation` (e.g. the output directory, a stop-after count)
    are never inherited from the run: they take this invocation's value, given or default.
    """
    paths = option_paths([p.name for p in ctx.command.params if p.name], cls, aliases=aliases,
                         not_config=not_config)
    given = explicit_params(ctx) & set(paths)
    cli_data = as_dict(cli_cfg)
    overrides = {paths[p]: _get(cli_data, paths[p]) for p in given}
    option_of = {paths[p]: option_name(p) for p in paths}
    if resume_from is not None:
        run_cfg = load_run_config(cls, resume_from)
        run_data = as_dict(run_cfg)
        requested = dict(overrides)
        if config_file is not None:
            file_data = as_dict(load(cls, config_file, base=run_cfg))
            requested = {**{p: _get(file_data, p) for p in leaf_paths(cls)}, **requested}
        resume_overrides(run_data, requested, resume_mutable, option_of, source=resume_from)
        for path in per_invocation:
            requested.setdefault(path, _get(cli_data, path))
        for path, value in requested.items():
            _set(run_data, path, value)
        return build(cls, run_data)
    base = load(cls, config_file, base=cli_cfg) if config_file is not None else cli_cfg
    data = as_dict(base)
    for path, value in overrides.items():
        _set(data, path, value)
    return build(cls, data)


def load_run_config(cls: type[C], path: str | Path) -> C:
    """A run's config.json as `cls`; errors name the file and the key."""
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"{p} does not exist: nothing to resume")
    try:
        data = strict_json_loads(decode_utf8(p.read_bytes(), str(p)))
    except (OSError, json.JSONDecodeError, DuplicateKeyError) as e:
        raise ConfigError(f"{p}: unreadable run config ({e})") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: not a run config (expected a JSON object)")
    try:
        return build(cls, data)
    except ConfigError as e:
        raise ConfigError(f"{p}: {e}") from None


def diff(a: Mapping[str, Any], b: Mapping[str, Any], prefix: str = "") -> list[tuple[str, Any, Any]]:
    """Leaves where two config dicts differ: (dotted path, a's value, b's value)."""
    out = []
    for key in sorted(set(a) | set(b)):
        path = f"{prefix}{key}"
        va, vb = a.get(key), b.get(key)
        if isinstance(va, Mapping) and isinstance(vb, Mapping):
            out += diff(va, vb, path + ".")
        elif va != vb:
            out.append((path, va, vb))
    return out


def resume_overrides(run_data: Mapping[str, Any], requested: Mapping[str, Any], mutable: Iterable[str],
                     option_of: Mapping[str, str] | None = None, *, source: str | Path = "config.json") -> None:
    """Raise ConfigError if a requested value differs from the run's at a field that may not change."""
    allowed = set(mutable)
    option_of = option_of or {}
    for path, value in requested.items():
        old = _get(run_data, path)
        if path in allowed or old == (list(value) if isinstance(value, tuple) else value):
            continue
        opt = option_of.get(path, path)
        raise ConfigError(
            f"{opt} {json.dumps(value)} differs from the run's {path} = {json.dumps(old)} in {source}; "
            f"a resumed run keeps its settings (only {', '.join(sorted(option_of.get(m, m) for m in allowed))} "
            "may change): drop the option, or start a new run"
        )


def check_resumed(cfg: Any, run_config: str | Path, mutable: Iterable[str]) -> None:
    """For library callers of a resume: `cfg` may differ from the run's config.json only in `mutable`."""
    run_cfg = load_run_config(type(cfg), run_config)
    run_data, data = as_dict(run_cfg), as_dict(cfg)
    requested = {path: _get(data, path) for path in leaf_paths(type(cfg))}
    resume_overrides(run_data, requested, mutable, source=run_config)
