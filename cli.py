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
from typing import Any, Callable, Sequence

from checkpoint import CheckpointError
from data import DataError


def flag(name: str) -> str:
    """The command-line flag of a config field: batch_size -> --batch-size."""
    return "--" + name.replace("_", "-")


def changed_flags(config: Any) -> list[str]:
    """The flags of a config dataclass instance whose values differ from its class's defaults, in field order."""
    default = type(config)()
    return [flag(f.name) for f in fields(config) if getattr(config, f.name) != getattr(default, f.name)]


def _parser_for(tp: Any):
    """argparse `type` for an annotation: int, float, str, tuples of ints, Optional[...]; its __name__ is what the
    flag takes, so that argparse says "invalid comma-separated integers value: 'x'"."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        inner = _parser_for(next(a for a in typing.get_args(tp) if a is not type(None)))
        parse = lambda s: None if s.lower() == "none" else inner(s)
        parse.__name__ = f"{inner.__name__} (or none)"
        return parse
    if origin is tuple:
        item = typing.get_args(tp)[0]
        parse = lambda s: tuple(item(v) for v in s.split(",") if v.strip())
        parse.__name__ = f"comma-separated {item.__name__}s (e.g. 1,2,4)".replace("ints", "integers")
        return parse
    return tp


def add_flags(parser: argparse.ArgumentParser, config: Any, exclude: Sequence[str] = (),
              presets: dict[str, dict[str, Any]] | None = None) -> None:
    """One --kebab-case flag per field of the dataclass instance `config` (but those in exclude), in a group named by
    its docstring, its help naming the value each preset sets; unset flags stay absent from the namespace."""
    hints, help_text = typing.get_type_hints(type(config)), field_comments(type(config))
    group = parser.add_argument_group((type(config).__doc__ or type(config).__name__).splitlines()[0].rstrip("."))
    for f in fields(config):
        if f.name in exclude:
            continue
        default = getattr(config, f.name)
        doc = help_text.get(f.name, "")
        text = doc if "default" in doc else f"{doc} (default: {_shown(default)})"
        set_by = {name: values[f.name] for name, values in (presets or {}).items() if f.name in values}
        if set_by:  # the value each preset starts from, where one sets it
            rest = [name for name in presets if name not in set_by]
            text = f"{doc} (default: " + "; ".join(
                [f"{_shown(value)} with --preset {name}" for name, value in set_by.items()]
                + ([f"{_shown(default)} with {' or '.join(rest)}"] if rest else [])) + ")"
        if hints[f.name] is bool:
            group.add_argument(flag(f.name), action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                               help=text)
        else:
            group.add_argument(flag(f.name), type=_parser_for(hints[f.name]), default=argparse.SUPPRESS,
                               metavar=f.name.upper(), help=text)


def _shown(value: Any) -> str:
    """A value as its flag takes it: (1, 2, 3) -> 1,2,3; () and None -> none."""
    if value is None or value == ():
        return "none"
    return ",".join(map(str, value)) if isinstance(value, tuple) else str(value)


class Renamed(argparse.Action):
    """An old spelling kept for users' scripts: sets dest to const and says the new spelling on stderr."""

    def __call__(self, parser, namespace, values, option_string=None):
        print(f"note: {option_string} is now {self.metavar} (the old spelling still works)", file=sys.stderr)
        setattr(namespace, self.dest, self.const if self.const is not None else values)


def add_weights_flag(parser: argparse.ArgumentParser) -> None:
    """--weights ema | raw, the one spelling of that choice in every script (--raw-weights: the old one)."""
    parser.add_argument("--weights", choices=("ema", "raw"), default="ema",
                        help="the EMA weights (default: ema) or the raw ones")
    parser.add_argument("--raw-weights", dest="weights", action=Renamed, nargs=0, const="raw",
                        metavar="--weights raw", help=argparse.SUPPRESS)


def config_from(args: argparse.Namespace | dict, config: Any, exclude: Sequence[str] = ()) -> Any:
    """A copy of the dataclass instance config with the fields that args sets (but those in exclude: flags of the
    same name that add_flags left to the script)."""
    values = vars(args) if isinstance(args, argparse.Namespace) else args
    names = {f.name for f in fields(config)} - set(exclude)
    return replace(config, **{name: values[name] for name in names if name in values})


def field_comments(config_cls: type) -> dict[str, str]:
    """Help strings from the trailing `# comment` of each field line in the dataclass source."""
    comments = {}
    for line in inspect.getsource(config_cls).splitlines():
        name, _, rest = line.strip().partition(":")
        if "#" in rest and name.isidentifier():
            comments[name] = rest.split("#", 1)[1].strip()
    return comments


def parse_configs(configs: Sequence[Any], presets: dict[str, dict[str, Any]] | None = None,
                  default_preset: str | None = None, argv: Sequence[str] | None = None,
                  description: str = "", prog: str | None = None) -> tuple[list[Any], str | None]:
    """Parse argv into copies of `configs` (dataclass instances holding the defaults). Returns the filled configs and
    the preset name used. A preset's keys may belong to any of the configs; a key that belongs to none is a programming
    error and raises. prog: the command its usage line names (default: the script's)."""
    parser = argparse.ArgumentParser(prog=prog, description=description, allow_abbrev=False,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    if presets:
        parser.add_argument("--preset", choices=sorted(presets), default=None,
                            help=f"named set of defaults, shown in [brackets] after each flag it sets (default here: "
                                 f"{default_preset}, chosen from the device)")
    for cfg in configs:
        assert is_dataclass(cfg)
        add_flags(parser, cfg, presets=presets)
        for old, new in getattr(cfg, "renamed", {}).items():  # hidden: --help shows the one spelling
            parser.add_argument(old, dest=new, action=Renamed, metavar=flag(new), default=argparse.SUPPRESS,
                                help=argparse.SUPPRESS)
    args = vars(parser.parse_args(sys.argv[1:] if argv is None else argv))
    preset = args.pop("preset", None) or default_preset
    overrides = dict(presets[preset]) if presets and preset else {}
    overrides.update(args)

    filled = [config_from(overrides, cfg) for cfg in configs]
    claimed = set().union(*({f.name for f in fields(c)} for c in configs))
    stray = set(overrides) - claimed
    if stray:
        raise KeyError(f"preset keys {sorted(stray)} belong to no config")
    return filled, preset


def run(main: Callable[[], object]) -> None:
    """A script's main(), with the errors a user can act on (a missing or foreign file, bad data, a value no run can
    use) printed as one line, `error: ...`, and exit status 1, instead of a traceback."""
    try:
        main()
    except (CheckpointError, DataError, ValueError, OSError) as e:
        sys.exit(f"error: {e}")
