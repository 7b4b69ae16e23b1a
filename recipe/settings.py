"""Settings read from JSON, typed by dataclass annotations: one checker for every settings block.

A field's annotation is the JSON type its key must have: ``bool`` takes only true/false, ``int`` only integers (not
true/false), ``float`` integers or finite numbers, ``Optional[...]`` also null, :data:`PathStr` a non-empty string,
``list[int]`` a list of integers, ``Literal["auto"]`` that string, ``dict[str, bool]`` an object of true/false
values whose keys ``Annotated[..., AllowedKeys(...)]`` restricts. :func:`check_value` raises a
:class:`~recipe.config.ConfigError` naming the key, the value and the expected type.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import typing
from dataclasses import dataclass
from typing import Annotated, Any, Literal, NewType, Optional, Union

from recipe.config import ConfigError

PathStr = NewType("PathStr", str)
"""A file or directory setting: a non-empty string."""


@dataclass(frozen=True)
class AllowedKeys:
    """``Annotated[dict[...], AllowedKeys(names, noun)]``: the keys a JSON-object setting may have."""

    names: tuple
    noun: str = "keys"


@functools.lru_cache(maxsize=None)
def field_types(cls: type) -> dict:
    """{field name: annotation} of a settings dataclass, with the annotations resolved (this module uses
    ``from __future__ import annotations``, so ``dataclasses.fields(cls)[i].type`` is only a string)."""
    hints = typing.get_type_hints(cls, include_extras=True)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


_NONE = type(None)
_SIMPLE = {  # annotation -> (what it accepts, in words; the plural, for "a list of ...")
    bool: ("true or false (a JSON boolean)", "booleans (true or false)"),
    int: ("an integer", "integers"),
    float: ("a number", "numbers"),
    str: ("a string", "strings"),
    PathStr: ("a non-empty string (a path)", "paths"),
}


def describe_type(tp: Any) -> str:
    """An annotation in words, as the JSON value it stands for (``Optional[float]`` -> "a number or null")."""
    if tp in _SIMPLE:
        return _SIMPLE[tp][0]
    if tp is _NONE:
        return "null"
    if tp is Any:
        return "any JSON value"
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Annotated:
        base, *extras = args
        keys = [m for m in extras if isinstance(m, AllowedKeys)]
        if keys and typing.get_origin(base) is dict:
            return (f"an object whose keys are some of {', '.join(keys[0].names)} and whose values are "
                    f"{describe_type(typing.get_args(base)[1])}")
        return describe_type(base)
    if origin is Literal:
        return " or ".join(json.dumps(a) for a in args)
    if tp is list or origin is list:
        item = args[0] if args else Any
        return f"a list of {_SIMPLE[item][1]}" if item in _SIMPLE else f"a list (each item {describe_type(item)})"
    if tp is dict or origin is dict:
        return f"an object whose values are {describe_type(args[1])}" if args else "a JSON object"
    if origin is Union:
        words = [describe_type(a) for a in args if a is not _NONE] + (["null"] if _NONE in args else [])
        return ", ".join(words[:-1]) + " or " + words[-1]
    raise TypeError(f"no JSON type check for the annotation {tp!r}")  # a new kind of field: teach check_value


def show(value: Any) -> str:
    """The value as it would be written in the JSON file (Python's repr for what JSON cannot hold)."""
    try:
        return json.dumps(value)
    except (TypeError, ValueError):
        return repr(value)


def kind_of(value: Any) -> str:
    """What a value is, in JSON words."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number" if math.isfinite(value) else "a non-finite number"
    if isinstance(value, str):
        return "a string" if value else "an empty string"
    if isinstance(value, (list, tuple)):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return f"a Python {type(value).__name__}"


def check_value(label: str, value: Any, tp: Any) -> Any:
    """``value`` if it has the JSON type the annotation ``tp`` stands for (integers become floats for a float;
    lists and objects come back as new containers), else a ConfigError
    ``<label>=<value as JSON>: expected <type in words>, got <what it is>``.

    Strict: true/false is not an integer, an integer is not true/false, "false" is a string, 1.0 is not an
    integer, and a number must be finite."""

    def fail(got: Optional[str] = None):
        raise ConfigError(f"{label}={show(value)}: expected {describe_type(tp)}, got {got or kind_of(value)}")

    if tp is Any:
        return value
    if tp is bool:
        return value if isinstance(value, bool) else fail()
    if tp is int:
        return value if isinstance(value, int) and not isinstance(value, bool) else fail()
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            fail()
        try:
            number = float(value)
        except OverflowError:
            fail("an integer too large for a float")
        return number if math.isfinite(number) else fail()
    if tp is str or tp is PathStr:
        return value if isinstance(value, str) and (value or tp is str) else fail()
    if tp is _NONE:
        return None if value is None else fail()
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Annotated:
        base, *extras = args
        if typing.get_origin(base) is dict and not isinstance(value, dict):
            fail()  # with the fuller description: the allowed keys too
        value = check_value(label, value, base)
        for keys in (m for m in extras if isinstance(m, AllowedKeys)):
            unknown = sorted(set(value) - set(keys.names))
            if unknown:
                raise ConfigError(f"{label}={show(value)}: unknown {keys.noun} {unknown}; expected some of "
                                  f"{list(keys.names)}")
        return value
    if origin is Literal:
        # type(...) is: Literal[1] must not take true (True == 1 in Python)
        return value if any(type(value) is type(a) and value == a for a in args) else fail(
            f"another {kind_of(value).split()[-1]}" if any(type(value) is type(a) for a in args) else None)
    if tp is list or origin is list:
        if not isinstance(value, list):
            fail()
        item = args[0] if args else Any
        return [check_value(f"{label}[{i}]", v, item) for i, v in enumerate(value)]
    if tp is dict or origin is dict:
        if not isinstance(value, dict):
            fail()
        key_type, item = args if args else (Any, Any)
        return {check_value(f"{label} key {show(k)}", k, key_type): check_value(f"{label}.{k}", v, item)
                for k, v in value.items()}
    if origin is Union:
        if value is None and _NONE in args:
            return None
        problems = []
        for member in args:
            try:
                return check_value(label, value, member)
            except ConfigError as e:
                problems.append((member, e))
        # a list or an object of the right shape with a wrong item: say which item
        for member, e in problems:
            shape = typing.get_origin(member) or member
            if shape in (list, dict) and isinstance(value, shape):
                raise e
        literal_kinds = {type(a) for m in args if typing.get_origin(m) is Literal for a in typing.get_args(m)}
        fail(f"another {kind_of(value).split()[-1]}" if type(value) in literal_kinds else None)
    raise TypeError(f"no JSON type check for the annotation {tp!r}")  # a new kind of field: teach check_value
