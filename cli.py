"""Turn typed config dataclasses into command-line flags, with named presets in between.

Precedence: dataclass defaults < the chosen preset < flags given on the command line.
"""
from __future__ import annotations

import argparse
import inspect
import sys
import types
import typing
from dataclasses import fields, is_dataclass, replace
from typing import Any, Sequence


def _parser_for(tp: Any):
    """argparse `type` for an annotation: int, float, str, bool, tuples of ints, Optional[...]."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        inner = next(a for a in typing.get_args(tp) if a is not type(None))
        parse_inner = _parser_for(inner)
        return lambda s: None if s.lower() == "none" else parse_inner(s)
    if origin is tuple:
        item = typing.get_args(tp)[0]
        return lambda s: tuple(item(v) for v in s.split(",") if v.strip())
    return tp


def add_flags(parser: argparse.ArgumentParser, config: Any) -> None:
    """One --kebab-case flag per field of the dataclass instance `config`; unset flags stay absent from the namespace."""
    hints = typing.get_type_hints(type(config))
    help_text = field_comments(type(config))
    for f in fields(config):
        flag = "--" + f.name.replace("_", "-")
        default = getattr(config, f.name)
        doc = help_text.get(f.name, "")
        if hints[f.name] is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                                help=f"{doc} (default: {default}, unless a preset sets it)")
            continue
        parser.add_argument(flag, type=_parser_for(hints[f.name]), default=argparse.SUPPRESS,
                            metavar=f.name.upper(), help=f"{doc} (default: {default}, unless a preset sets it)")


def field_comments(config_cls: type) -> dict[str, str]:
    """Help strings from the trailing `# comment` of each field line in the dataclass source."""
    comments = {}
    for line in inspect.getsource(config_cls).splitlines():
        name, _, rest = line.strip().partition(":")
        if "#" in rest and name.isidentifier():
            comments[name] = rest.split("#", 1)[1].strip()
    return comments


def parse_configs(
    configs: Sequence[Any],
    presets: dict[str, dict[str, Any]] | None = None,
    default_preset: str | None = None,
    argv: Sequence[str] | None = None,
    description: str = "",
) -> tuple[list[Any], str | None]:
    """Parse argv into copies of `configs` (dataclass instances holding the defaults).

    Returns the filled configs and the preset name used. A preset's keys may belong to any of the
    configs; a key that belongs to none is a programming error and raises.
    """
    parser = argparse.ArgumentParser(description=description, allow_abbrev=False)
    if presets:
        parser.add_argument("--preset", choices=sorted(presets), default=None,
                            help=f"named set of defaults (default: {default_preset}, chosen from the device)")
    for cfg in configs:
        assert is_dataclass(cfg)
        add_flags(parser, cfg)
    args = vars(parser.parse_args(sys.argv[1:] if argv is None else argv))
    preset = args.pop("preset", None) or default_preset
    overrides = dict(presets[preset]) if presets and preset else {}
    overrides.update(args)

    filled = []
    for cfg in configs:
        names = {f.name for f in fields(cfg)}
        filled.append(replace(cfg, **{k: v for k, v in overrides.items() if k in names}))
    claimed = set().union(*({f.name for f in fields(c)} for c in configs))
    stray = set(overrides) - claimed
    if stray:
        raise KeyError(f"preset keys {sorted(stray)} belong to no config")
    return filled, preset
