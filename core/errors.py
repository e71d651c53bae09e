"""Errors a user can act on. The CLI prints their message, never a traceback."""

from __future__ import annotations


class AdapterdeckError(Exception):
    """A mistake in input or configuration; the message says what and where."""


class UnknownNameError(AdapterdeckError, KeyError):
    def __init__(self, kind: str, name: str, known: list[str]) -> None:
        self.kind, self.name, self.known = kind, name, known
        listed = ", ".join(sorted(known)) or "none"
        super().__init__(f"unknown {kind} {name!r}; known {kind}s: {listed}")

    def __str__(self) -> str:
        return str(self.args[0])
