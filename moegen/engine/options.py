"""Engine options generated from their one declaration (the Options of moegen.engine.config): the
argparse flags, typed values from text, and the names every consumer accepts.

Two groups, both by public name. Load options (dtype, device) are parameters of their own in every
consumer (CLI flags, flow parameters, System.run, MoegenLM); engine options (the rest) travel
together as keyword arguments of Engine.from_pretrained / from_config. Everywhere None means
unset: the engine's default, or its planner's choice. Values are checked by EngineConfig only.
"""
import argparse
from dataclasses import fields, replace

from moegen.engine.config import DTYPE, EngineConfig, Option
from moegen.errors import InputError


def _field_options() -> "dict[str, Option]":
    """EngineConfig field -> its Option, with the public name filled in."""
    declared = {f.name: f.metadata["option"] for f in fields(EngineConfig)}
    return {name: replace(opt, name=opt.name or name) for name, opt in declared.items()}


_BY_FIELD = _field_options()
FIELD_OF = {opt.name: name for name, opt in _BY_FIELD.items()}      # public name -> EngineConfig field
LOAD_OPTIONS = (DTYPE, *(opt for opt in _BY_FIELD.values() if opt.load_arg))
ENGINE_OPTIONS = tuple(opt for opt in _BY_FIELD.values() if not opt.load_arg)
_ENGINE_BY_NAME = {opt.name: opt for opt in ENGINE_OPTIONS}


def engine_option_names() -> "list[str]":
    return list(_ENGINE_BY_NAME)


def add_arguments(parser, options) -> None:
    """One flag --name-with-dashes per option. Engine options default to None, so that only what
    the user gave reaches the engine (and `moegen eval --system hf` sees none); load options to
    their declared default."""
    for opt in options:
        described = opt.help if opt.default is None else f"{opt.help} (default {opt.default})"
        kw = dict(default=opt.default if opt.load_arg else None, help=described.replace("%", "%%"))
        if opt.kind == "bool":
            kw["action"] = argparse.BooleanOptionalAction
        elif opt.kind == "int":
            kw["type"] = int
        parser.add_argument("--" + opt.name.replace("_", "-"), **kw)


def values_of(args, options) -> dict:
    """The options given on parsed arguments, by public name."""
    return {opt.name: getattr(args, opt.name) for opt in options if getattr(args, opt.name, None) is not None}


def unknown_engine_options(given) -> "list[str]":
    """The names among `given` that are no engine option, sorted (the one check of option names)."""
    return sorted(set(given) - set(_ENGINE_BY_NAME))


def parse_options(given: dict) -> dict:
    """Engine options by public name -> Engine keyword arguments: text ("8", "false") read as the
    option's kind, None (unset) dropped; an unknown name is an InputError naming the known ones."""
    unknown = unknown_engine_options(given)
    if unknown:
        raise InputError(f"unknown engine option(s) {', '.join(unknown)}; known: {', '.join(_ENGINE_BY_NAME)}")
    return {name: _ENGINE_BY_NAME[name].parsed(name, value) if isinstance(value, str) else value
            for name, value in given.items() if value is not None}


def config_of(options: dict) -> EngineConfig:
    """The EngineConfig that options by public name amount to (its checks raise InputError)."""
    return EngineConfig(**{FIELD_OF[name]: value for name, value in parse_options(options).items()})
