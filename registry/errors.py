"""The registry's errors: what is missing, what would break, and storage that failed."""

from __future__ import annotations

from adapterdeck.core.errors import AdapterdeckError, Fault


class NotFound(AdapterdeckError):
    """No such tenant, adapter, version or alias."""

    http_status = 404


class Conflict(AdapterdeckError):
    """The operation would break something that depends on the target, or the target's state."""

    http_status = 409


class StorageFault(Fault):
    """A blob is corrupt or missing, or the storage cannot be used: the server's problem, not the
    caller's (the registry's records point at bytes that are not there as recorded)."""
