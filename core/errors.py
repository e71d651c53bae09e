"""Errors a user can act on. The CLI prints their message, never a traceback."""

from __future__ import annotations


class AdapterdeckError(Exception):
    """A mistake in input or configuration; the message says what and where."""


class UnknownNameError(AdapterdeckError, KeyError):
    """An unknown format, method or evaluator. The message lists the known ones, a close name if
    there is one, and the plugins that failed to load (what they would register is missing)."""

    def __init__(
        self,
        kind: str,
        name: str,
        known: list[str],
        *,
        close: str | None = None,
        failed: list[str] | None = None,
    ) -> None:
        self.kind, self.name, self.known, self.close = kind, name, known, close
        self.failed = list(failed or [])
        message = f"unknown {kind} {name!r}"
        if close:
            message += f" (did you mean {close!r}?)"
        message += f"; known {kind}s: {', '.join(sorted(known)) or 'none'}"
        if self.failed:
            message += (
                f"; {len(self.failed)} plugin(s) failed to load, so what they register is missing: "
                + "; ".join(self.failed)
            )
        super().__init__(message)

    def __str__(self) -> str:
        return str(self.args[0])
