"""Command-line options generated from the pydantic config models.

Every leaf field of a command's config gets one flag named after its dotted path
(`--logging.proj-dim-in`), with its help, choices and default read from the field, so the
command line cannot drift from the config. Short and legacy names are `Alias`es (the one
table is `ALIASES` in flows/cli.py). A flag only records (path, value); pydantic validates
the assembled config, and a flag that is not given leaves the `--config` file's value alone.
"""

from __future__ import annotations

import argparse
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel
from pydantic.fields import FieldInfo

OVERRIDES = "config_overrides"  # namespace attribute: [(path, value, extend)] in command-line order
REQUIRED = object()  # effective default of a field that has none


@dataclass(frozen=True)
class Alias:
    """A short or legacy flag for one or more dotted config paths.

    A bool path takes no value: the flag sets False when it starts with `--no-`, else True.
    `extend` makes the flag repeatable; each occurrence appends `extend(i, value)` (i from 1)
    to the list at the path, after what the config file holds there."""

    flag: str
    paths: tuple[str, ...]
    commands: tuple[str, ...] | None = None  # None: every command whose config has all the paths
    help: str | None = None
    extend: Callable[[int, str], Any] | None = None


@dataclass(frozen=True)
class Leaf:
    """One settable field of a command's config."""

    path: str
    info: FieldInfo
    kind: type | Any  # bool, int, float, str or a Literal, with Optional and list taken off
    is_list: bool
    optional: bool
    default: Any  # the effective default of this command's config, or REQUIRED


def unwrap_optional(annotation: Any) -> tuple[Any, bool]:
    if get_origin(annotation) in (Union, types.UnionType):
        args = [a for a in get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0], len(args) < len(get_args(annotation))
    return annotation, False


def model_class(annotation: Any) -> type[BaseModel] | None:
    inner, _ = unwrap_optional(annotation)
    return inner if isinstance(inner, type) and issubclass(inner, BaseModel) else None


def field_default(info: FieldInfo) -> Any:
    return REQUIRED if info.is_required() else info.get_default(call_default_factory=True)


def walk(cls: type[BaseModel], skip: set[str], prefix: str = "", defaults: Any = None) -> Iterator[Leaf]:
    """The leaves of `cls` (nested models walked), with the defaults of the enclosing default instance.

    A parent's default_factory may set its section's defaults (DemoConfig.logging has 32×32
    projections), so a leaf's default is read from the parent's default instance when there is one."""
    for name, info in cls.model_fields.items():
        path = prefix + name
        if path in skip:
            continue
        default = getattr(defaults, name) if isinstance(defaults, BaseModel) else field_default(info)
        nested = model_class(info.annotation)
        if nested is not None:
            yield from walk(nested, skip, path + ".", default)
            continue
        kind, optional = unwrap_optional(info.annotation)
        is_list = get_origin(kind) is list
        if is_list:
            (kind,) = get_args(kind)
        if not (kind in (bool, int, float, str) or get_origin(kind) is Literal) or (is_list and kind is bool):
            raise TypeError(
                f"{cls.__name__}.{name}: no command-line form for {info.annotation}; add it to the skip list"
            )
        yield Leaf(path, info, kind, is_list, optional, default)


def format_default(value: Any) -> str:
    """A default as it would be typed on the command line."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list | tuple):
        return " ".join(map(format_default, value)) if value else "empty"
    return str(value)


def _parse_none(kind: type) -> Callable[[str], Any]:
    def convert(text: str) -> Any:
        return None if text.lower() == "none" else kind(text)

    convert.__name__ = f"{kind.__name__} or none"  # argparse names the type in its error
    return convert


class _Set(argparse.Action):
    """Records the value for every path; pydantic validates it with the rest of the config."""

    def __init__(self, option_strings, dest, paths, extend=None, **kwargs):
        super().__init__(option_strings, dest, default=argparse.SUPPRESS, **kwargs)
        self.paths, self.extend = paths, extend

    def __call__(self, parser, namespace, values, option_string=None):
        record(namespace, [(path, values, self.extend) for path in self.paths])


class _Switch(argparse.Action):
    """A bool field: `--no-...` sets False, any other spelling True."""

    def __init__(self, option_strings, dest, paths, **kwargs):
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)
        self.paths = paths

    def __call__(self, parser, namespace, values, option_string=None):
        value = not option_string.startswith("--no-")
        record(namespace, [(path, value, None) for path in self.paths])


def record(namespace: argparse.Namespace, items: list) -> None:
    setattr(namespace, OVERRIDES, [*getattr(namespace, OVERRIDES, []), *items])  # a copy: no shared default


def _help(text: str) -> str:
    return text.replace("%", "%%")  # argparse %-formats help strings


def leaf_help(leaf: Leaf) -> str:
    text = (leaf.info.description or "").rstrip()
    if leaf.optional and leaf.kind is not str and get_origin(leaf.kind) is not Literal:
        text += " `none` unsets it."
    default = "required" if leaf.default is REQUIRED else f"default: {format_default(leaf.default)}"
    return f"{text} ({default})".strip()


def _value_kwargs(leaf: Leaf) -> dict[str, Any]:
    kwargs: dict[str, Any] = {}
    if get_origin(leaf.kind) is Literal:
        kwargs["choices"] = list(get_args(leaf.kind))
    else:
        kwargs["type"] = _parse_none(leaf.kind) if leaf.optional and leaf.kind is not str else leaf.kind
        kwargs["metavar"] = {int: "INT", float: "FLOAT", str: "TEXT"}[leaf.kind]
    if leaf.is_list:
        kwargs["nargs"] = "*"
    return kwargs


def canonical_flags(leaf: Leaf) -> list[str]:
    flag = leaf.path.replace("_", "-")
    return [f"--{flag}", f"--no-{flag}"] if leaf.kind is bool else [f"--{flag}"]


def add_config_options(
    parser: argparse.ArgumentParser,
    command: str,
    cls: type[BaseModel],
    aliases: tuple[Alias, ...],
    skip: set[str],
) -> dict[str, list[str]]:
    """Add a flag per leaf of `cls` (and the aliases that apply to `command`); returns path → flags."""
    leaves = {leaf.path: leaf for leaf in walk(cls, skip)}
    applicable = []
    for alias in aliases:
        present = all(p in leaves or p in cls.model_fields for p in alias.paths)
        if alias.commands is None and present or alias.commands is not None and command in alias.commands:
            if not present:
                raise ValueError(f"alias {alias.flag} names {alias.paths}, not all fields of {cls.__name__}")
            applicable.append(alias)
    # A one-path alias is another spelling of the path's own flag, shown on the same help line.
    joined = {a.paths[0]: a for a in applicable if len(a.paths) == 1 and a.extend is None}
    groups: dict[str, argparse._ArgumentGroup] = {}
    flags: dict[str, list[str]] = {}

    def group(path: str):
        section = path.rpartition(".")[0].split(".")[0]
        if not section:
            return parser
        if section not in groups:
            info = cls.model_fields[section]
            about = info.description if info.default is None and not info.is_required() else None
            groups[section] = parser.add_argument_group(f"{section} ({model_class(info.annotation).__name__})", about)
        return groups[section]

    # The rest (several paths like --proj-dim, or repeatable like --prompt) go beside their first path.
    rest: dict[str, list[Alias]] = {}
    for a in applicable:
        if joined.get(a.paths[0]) is not a:
            rest.setdefault(a.paths[0], []).append(a)
    for path, leaf in leaves.items():
        for alias in rest.pop(path, []):
            _add_alias(group(path), alias, leaves, flags)
        names = canonical_flags(leaf)
        if path in joined:
            names.insert(0, joined[path].flag)
        flags.setdefault(path, []).extend(names)
        action = dict(action=_Switch) if leaf.kind is bool else dict(action=_Set, **_value_kwargs(leaf))
        group(path).add_argument(*names, paths=(path,), help=_help(leaf_help(leaf)), **action)
    for path, left in rest.items():
        for alias in left:
            _add_alias(group(path), alias, leaves, flags)
    return flags


def _add_alias(group, alias: Alias, leaves: dict[str, Leaf], flags: dict[str, list[str]]) -> None:
    for p in alias.paths:
        flags.setdefault(p, []).append(alias.flag)
    if alias.extend is not None:
        help_ = f"{alias.help} Repeatable; appends to {alias.paths[0]}."
        group.add_argument(
            alias.flag, action=_Set, paths=alias.paths, extend=alias.extend, metavar="TEXT", help=_help(help_)
        )
        return
    targets = [leaves[p] for p in alias.paths]
    help_ = f"{alias.help or targets[0].info.description or ''} Sets {', '.join(alias.paths)}."
    defaults = {format_default(t.default) for t in targets if t.default is not REQUIRED}
    if len(defaults) == 1 and all(t.default is not REQUIRED for t in targets):
        help_ += f" (default: {defaults.pop()})"
    if targets[0].kind is bool:
        group.add_argument(alias.flag, action=_Switch, paths=alias.paths, help=_help(help_))
    else:
        group.add_argument(alias.flag, action=_Set, paths=alias.paths, help=_help(help_), **_value_kwargs(targets[0]))


def apply_overrides(data: dict[str, Any], overrides: list) -> dict[str, Any]:
    """Write the flags' (path, value) pairs into the config dict read from the file (flags win)."""
    extended: dict[tuple[str, Callable], list] = {}
    for path, value, extend in overrides:
        if extend is not None:
            extended.setdefault((path, extend), []).append(value)
            continue
        _set(data, path, value)
    for (path, extend), values in extended.items():
        *parents, key = path.split(".")
        section = _section(data, parents, path)
        section[key] = [*(section.get(key) or []), *(extend(i, v) for i, v in enumerate(values, 1))]
    return data


def _section(data: dict, keys: list[str], path: str) -> dict:
    for k in keys:
        if data.get(k) is None:
            data[k] = {}
        if not isinstance(data[k], dict):
            raise ValueError(f"the config file sets {k} to {data[k]!r}, but a flag sets {path} inside it")
        data = data[k]
    return data


def _set(data: dict, path: str, value: Any) -> None:
    *parents, key = path.split(".")
    _section(data, parents, path)[key] = value


def fill_section_defaults(cls: type[BaseModel], data: dict[str, Any]) -> dict[str, Any]:
    """Keep the command's own section defaults where a section is given in part.

    pydantic builds a section given as a dict from the section model's defaults, so
    `{"logging": {"batch_size": 4}}` would drop DemoConfig's 32×32 projections; the values the
    parent's default_factory sets are filled in first, so what `--help` shows is what you get."""
    for name, info in cls.model_fields.items():
        section, nested = data.get(name), model_class(info.annotation)
        if nested is None or not isinstance(section, dict):
            continue
        if info.default_factory is not None:
            default = info.default_factory()
            if isinstance(default, BaseModel):
                for key, value in default.model_dump(include=default.model_fields_set).items():
                    section.setdefault(key, value)
        fill_section_defaults(nested, section)
    return data
