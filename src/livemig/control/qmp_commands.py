"""QMP commands as Python functions: which arguments a handler takes, checked against
its signature at registration, and QEMU's error messages for what a client gets wrong.
"""

from __future__ import annotations

import inspect
import logging
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from livemig.control.qmp_protocol import QMPError

log = logging.getLogger("livemig.control.qmp_server")



JSON_TYPE_NAMES: dict[type, str] = {
    bool: "boolean",
    int: "integer",
    float: "number",
    str: "string",
    list: "array",
    dict: "object",
}


@dataclass(frozen=True)
class Param:
    py_name: str
    required: bool
    #: Python types of acceptable JSON values, or None when the annotation is not checked.
    accepted: frozenset[type] | None
    expected: str


@dataclass(frozen=True)
class Command:
    name: str
    func: Callable[..., Any]
    params: dict[str, Param]  # keyed by QMP (dashed) name
    accepts_extra: bool  # the handler has **kwargs
    inline: bool  # built-ins run on the loop: they are instant and touch per-client state


def type_spec(annotation: Any) -> tuple[frozenset[type], str] | None:
    """Map an annotation to the JSON types it admits, if it is simple enough to check.

    Checking here gives clients QEMU's "Invalid parameter type" error instead of whatever a
    handler does with a string where it wanted an int. Annotations we do not understand
    (unresolved strings, Literal, custom classes) are left to the handler.
    """
    if annotation is inspect.Parameter.empty or annotation is Any or isinstance(annotation, str):
        return None
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        members = typing.get_args(annotation)
    else:
        members = (annotation,)
    accepted: set[type] = set()
    names: list[str] = []
    for member in members:
        if member is type(None):
            accepted.add(type(None))
            continue
        base = typing.get_origin(member) or member
        if base not in JSON_TYPE_NAMES:
            return None
        accepted.add(base)
        names.append(JSON_TYPE_NAMES[base])
    return frozenset(accepted), " or ".join(names) or "null"


def json_value_matches(value: Any, accepted: frozenset[type]) -> bool:
    if isinstance(value, bool):  # before int: bool is an int subclass, JSON keeps them apart
        return bool in accepted
    if isinstance(value, int):  # a JSON integer is also a valid "number"
        return int in accepted or float in accepted
    return type(value) in accepted


def build_command(name: str, func: Callable[..., Any], *, inline: bool = False) -> Command:
    """Work out once, at registration, which QMP arguments a handler takes.

    Registration is where a handler that can never be called by name (positional-only
    parameters without defaults) should fail, not at the first client request.
    """
    try:
        sig = inspect.signature(func, eval_str=True)
    except Exception:  # annotations naming TYPE_CHECKING-only imports: skip type checks
        sig = inspect.signature(func)
    params: dict[str, Param] = {}
    accepts_extra = False
    for p in sig.parameters.values():
        if p.kind is inspect.Parameter.VAR_KEYWORD:
            accepts_extra = True
        elif p.kind is inspect.Parameter.VAR_POSITIONAL:
            continue
        elif p.kind is inspect.Parameter.POSITIONAL_ONLY:
            if p.default is inspect.Parameter.empty:
                raise TypeError(
                    f"QMP command {name!r}: handler parameter {p.name!r} is positional-only "
                    "and cannot receive a QMP argument"
                )
        else:
            spec = type_spec(p.annotation)
            params[p.name.replace("_", "-")] = Param(
                py_name=p.name,
                required=p.default is inspect.Parameter.empty,
                accepted=spec[0] if spec else None,
                expected=spec[1] if spec else "",
            )
    return Command(name, func, params, accepts_extra, inline)


def bind_arguments(cmd: Command, args: dict[str, Any]) -> dict[str, Any]:
    """Turn QMP arguments into handler keyword arguments, with QEMU's error messages."""
    for qmp_name, param in cmd.params.items():
        if param.required and qmp_name not in args:
            raise QMPError(f"Parameter '{qmp_name}' is missing")
    declared = {p.py_name for p in cmd.params.values()}
    kwargs: dict[str, Any] = {}
    for key, value in args.items():
        param = cmd.params.get(key)
        if param is None:
            py_name = key.replace("-", "_")
            # The underscore spelling of a declared parameter is not an alias for it.
            if not cmd.accepts_extra or py_name in declared or py_name in kwargs:
                raise QMPError(f"Parameter '{key}' is unexpected")
            kwargs[py_name] = value
            continue
        if param.accepted is not None and not json_value_matches(value, param.accepted):
            raise QMPError(f"Invalid parameter type for '{key}', expected: {param.expected}")
        kwargs[param.py_name] = value
    return kwargs


def call_handler(cmd: Command, kwargs: dict[str, Any]) -> Any:
    """Run a handler on a worker thread, turning every failure into a QMPError.

    Anything else escaping into the executor future would be re-raised on the event loop,
    and a SystemExit there would take the whole server down.
    """
    try:
        return cmd.func(**kwargs)
    except QMPError:
        raise
    except BaseException as exc:
        log.exception("QMP command %s failed", cmd.name)
        raise QMPError(str(exc) or type(exc).__name__) from exc
