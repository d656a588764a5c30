"""Control verbs: the one way the disk service, the relocation proxy and the VM supervisor declare what
their control sockets answer.

A verb is a name, a help line, a pydantic model of its arguments and a handler that takes the validated
model: unknown, missing or wrongly typed arguments are refused with a clear message before any handler
runs, so a handler never digs in a raw dict. Handlers may be plain or ``async``; they raise
:class:`~hikkoshi.nbd.control.ControlError` (or ``ValueError``/``OSError``) for the caller to read.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

from hikkoshi.nbd.control import ControlError, ControlServer

A = TypeVar("A", bound=BaseModel)
R = TypeVar("R")


class Args(BaseModel):
    """Base of every verb's arguments: unknown names are refused."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class NoArgs(Args):
    """A verb without arguments."""


@dataclass(frozen=True)
class Verb(Generic[A]):
    """One verb."""

    name: str
    args: type[A]
    handler: Callable[[A], Any]
    help: str


def _short(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"]) or "arguments"
        parts.append(f"{where}: {err['msg']}")
    return "; ".join(parts)


class Verbs:
    """The verbs of one process."""

    def __init__(self) -> None:
        self._verbs: dict[str, Verb[Any]] = {}

    def verb(self, name: str, args: type[A], help: str) -> Callable[[Callable[[A], R]], Callable[[A], R]]:
        """Declare a verb (decorator)."""

        def declare(handler: Callable[[A], R]) -> Callable[[A], R]:
            if name in self._verbs:
                raise ValueError(f"verb {name!r} declared twice")
            self._verbs[name] = Verb(name, args, handler, help)
            return handler

        return declare

    @property
    def names(self) -> list[str]:
        """Every verb's name, sorted."""
        return sorted(self._verbs)

    def install(self, server: ControlServer) -> None:
        """Answer every verb on ``server``."""
        for verb in self._verbs.values():
            fields = ", ".join(verb.args.model_fields)
            server.register(
                verb.name, self._adapter(verb), verb.help + (f" (args: {fields})" if fields else "")
            )

    @staticmethod
    def _adapter(verb: Verb[Any]) -> Callable[[dict[str, Any]], Any]:
        def call(raw: dict[str, Any]) -> Any:
            try:
                args = verb.args.model_validate(raw)
            except ValidationError as exc:
                raise ControlError(f"{verb.name}: {_short(exc)}") from None
            return verb.handler(args)

        return call
