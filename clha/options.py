"""Configurations as dataclasses whose fields carry their command-line help: one mechanism for every entry point.

A field declared with `option(default, help, ...)` is also a command-line option `--<field name>` of the parser that
`build_parser(cls)` builds: its type from the annotation (`bool` fields get `--x / --no-x`), its help text, and
optionally `choices`, `required`, `nargs` (a list field) and `aliases` (other spellings of the same option, e.g. the
name an older version used). A class decorated with `@aliased` also takes the aliases as constructor keywords, and
`config_from_dict` reads saved configs written under either name. The training (`clha.config.TrainConfig`),
evaluation (`clha.eval.config.EvalConfig`) and reward-model training (`clha.rm.config.RewardTrainConfig`) configs are
all built this way, so each one's `--help` is its reference.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
from dataclasses import MISSING, field
from typing import Any, Dict, Iterable, Optional, Sequence

_TYPES = {"int": int, "float": float, "str": str, "Optional[int]": int, "Optional[float]": float,
          "Optional[str]": str, "List[str]": str}


def option(default=MISSING, help: str = "", *, aliases: Iterable[str] = (), default_factory=MISSING, **kw):
    """A dataclass field that is also a command-line option. ``aliases``: other names of the option (without
    dashes); further keywords (``choices``, ``required``, ``nargs``) go to `argparse.ArgumentParser.add_argument`."""
    metadata = {"help": help, "aliases": tuple(aliases), **kw}
    if default_factory is not MISSING:
        return field(default_factory=default_factory, metadata=metadata)
    return field(default=default, metadata=metadata)


def aliases_of(cls) -> Dict[str, str]:
    """{alias: field name} of a config class."""
    return {alias: f.name for f in dataclasses.fields(cls) for alias in f.metadata.get("aliases", ())}


def aliased(cls):
    """Class decorator: the constructor also takes each field's aliases as keywords (two names of one field given
    together are a TypeError)."""
    names = aliases_of(cls)
    init = cls.__init__

    @functools.wraps(init)
    def __init__(self, *args, **kwargs):
        for alias, name in names.items():
            if alias in kwargs:
                if name in kwargs:
                    raise TypeError(f"{cls.__name__}: {alias!r} and {name!r} are two names of one setting")
                kwargs[name] = kwargs.pop(alias)
        init(self, *args, **kwargs)

    cls.__init__ = __init__
    return cls


def config_from_dict(cls, values: Dict[str, Any]):
    """A config from a dict (e.g. a saved config JSON): known fields and their aliases; other keys are ignored."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    aliases = aliases_of(cls)
    kwargs = {}
    for key, value in values.items():
        name = key if key in fields else aliases.get(key)
        if name is not None and (name == key or name not in values):
            if isinstance(value, str) and fields[name].type in (float, "float") and value.lower() in ("inf", "-inf"):
                value = float(value)          # written as a string: JSON has no infinity
            kwargs[name] = value
    return cls(**kwargs)


def build_parser(cls, description: str = "", parser: Optional[argparse.ArgumentParser] = None,
                 skip: Sequence[str] = ()) -> argparse.ArgumentParser:
    """An argparse parser with one option per field of the dataclass ``cls`` (fields in ``skip`` left out)."""
    parser = parser or argparse.ArgumentParser(description=description,
                                               formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        meta = dict(f.metadata)
        help_text = meta.pop("help", "")
        flags = ["--" + f.name] + ["--" + a for a in meta.pop("aliases", ())]
        default = f.default_factory() if f.default_factory is not MISSING else f.default
        if meta.get("required"):
            default = None
        if f.type in ("bool", bool):
            parser.add_argument(*flags, dest=f.name, action=argparse.BooleanOptionalAction, default=default,
                                help=help_text)
            continue
        parser.add_argument(*flags, dest=f.name, type=_TYPES.get(str(f.type), str), default=default,
                            help=help_text, **meta)
    return parser


def parse_args_into(cls, argv: Optional[Sequence[str]] = None, description: str = ""):
    """Parse ``argv`` (default: sys.argv) into a ``cls`` instance."""
    return cls(**vars(build_parser(cls, description).parse_args(argv)))
