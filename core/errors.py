"""The errors adapterdeck raises on purpose, by whose problem they are.

Every one is an ``AdapterdeckError``: the CLI prints its message (never a traceback) and exits 2;
the gateway answers its ``http_status``. The class says whose problem it is:

- ``AdapterdeckError`` itself: a mistake in input or configuration (400); the message says what
  to fix and where;
- ``adapterdeck.registry.errors.NotFound`` (404) and ``Conflict`` (409, everywhere);
- ``Fault``: not the caller's mistake: damaged or unusable storage, an engine that misbehaves.
  The gateway answers 500 with an incident id and writes the message to its log only.
"""

from __future__ import annotations


class AdapterdeckError(Exception):
    """A mistake in input or configuration; the message says what and where."""

    http_status = 400


class Fault(AdapterdeckError):
    """Something broke on the server's side (storage, an engine), not in the caller's request."""

    http_status = 500


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
