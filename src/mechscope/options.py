"""Command-line options generated from config dataclasses, so every default is written once.

    @dataclass
    class HarvestConfig:
        n_tokens: int = option(help="activation rows to write", flag="--tokens")
        seed: int = option(0, help="shuffles the corpus' document order")

    add_options(parser, HarvestConfig)          # --tokens (required), --seed (default 0) ...
    cfg = config_from_args(HarvestConfig, args)  # HarvestConfig(n_tokens=args.n_tokens, seed=args.seed, ...)

Why: the CLI and the Python API used to write the same defaults twice (argparse and the dataclass) and
they drifted. Here the dataclass is the single source: the option's type, default, choices and help
come from the field, and the argparse `dest` is the field name, so building the config back is a plain
`cls(**fields)`.

Flag names: `--field-name` by default; `flag=` renames it (`n_tokens` -> `--tokens`). A bool field is a
switch that flips its default: `--name` for a default False, `--no-name` for a default True (or `flag=`,
e.g. `exclude_bos` -> `--keep-bos`). Fields with `cli=False` are API-only.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from typing import Any, TypeVar

T = TypeVar("T")
_MISSING = dataclasses.MISSING


def option(default: Any = _MISSING, *, help: str = "", flag: str | None = None, choices: Any = None,
           cli: bool = True, default_factory: Any = _MISSING) -> Any:
    """A dataclass field that is also a CLI option (see the module docstring). No default = a required option."""
    meta = {"help": help, "flag": flag, "choices": tuple(choices) if choices is not None else None, "cli": cli}
    if default_factory is not _MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def _scalar_type(tp: Any) -> tuple[type, bool]:
    """(argparse type, optional?) of an annotation: int, float, str, bool, list[str] (given comma-separated),
    each possibly `| None`."""
    optional = False
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        optional = len(args) < len(typing.get_args(tp))
        if len(args) != 1:
            raise TypeError(f"CLI options need one scalar type, got {tp!r}.")
        tp = args[0]
    if typing.get_origin(tp) is list:
        return str, optional  # a comma-separated list: the dataclass splits it
    if tp not in (int, float, str, bool):
        raise TypeError(f"No CLI type for {tp!r}.")
    return tp, optional


def cli_fields(cls: type) -> list[dataclasses.Field]:
    """The fields of dataclass `cls` that are CLI options, in declaration order."""
    return [f for f in dataclasses.fields(cls) if f.init and f.metadata.get("cli", True)]


def flag_of(f: dataclasses.Field) -> str:
    """The command-line flag of a field (see the module docstring)."""
    if f.metadata.get("flag"):
        return f.metadata["flag"]
    name = f.name.replace("_", "-")
    return f"--no-{name}" if f.default is True else f"--{name}"


def add_options(parser: argparse.ArgumentParser, cls: type, *, skip: tuple[str, ...] = ()) -> None:
    """Add one option per CLI field of dataclass `cls` (except `skip`) to `parser`; dest = the field name."""
    hints = typing.get_type_hints(cls)
    for f in cli_fields(cls):
        if f.name in skip:
            continue
        tp, _ = _scalar_type(hints[f.name])
        help_ = f.metadata.get("help") or None
        has_default = f.default is not _MISSING or f.default_factory is not _MISSING
        default = f.default if f.default is not _MISSING else (
            f.default_factory() if f.default_factory is not _MISSING else None)
        if tp is bool:
            if not has_default:
                raise TypeError(f"{cls.__name__}.{f.name}: a bool option needs a default.")
            parser.add_argument(flag_of(f), dest=f.name, action="store_false" if default else "store_true",
                                help=help_)
            continue
        flag = flag_of(f)
        kw: dict[str, Any] = {"dest": f.name, "type": tp, "help": help_,
                              "metavar": flag.lstrip("-").replace("-", "_").upper()}
        if f.metadata.get("choices"):
            kw["choices"] = list(f.metadata["choices"])
            del kw["metavar"]
        if has_default:
            kw["default"] = default
        else:
            kw["required"] = True
        parser.add_argument(flag, **kw)


def config_from_args(cls: type[T], args: argparse.Namespace, **extra: Any) -> T:
    """`cls` built from the parsed options that add_options(…, cls) added (skipped fields keep their
    defaults unless given in `extra`)."""
    values = {f.name: getattr(args, f.name) for f in cli_fields(cls) if hasattr(args, f.name)}
    return cls(**(values | extra))


def parser_defaults(parser: argparse.ArgumentParser) -> dict[str, Any]:
    """{dest: default} of every option of `parser` (for checking a hand-written option against the API)."""
    return {a.dest: a.default for a in parser._actions if a.dest != "help"}


__all__ = ["add_options", "cli_fields", "config_from_args", "flag_of", "option", "parser_defaults"]
