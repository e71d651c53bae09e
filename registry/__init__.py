"""The adapter registry: ``Registry`` is the Python API; ``adapterdeck registry`` the CLI."""

from adapterdeck.registry.errors import Conflict, NotFound, StorageFault
from adapterdeck.registry.refs import InvalidRef, Ref, parse_ref
from adapterdeck.registry.registry import Registry, VersionInfo
from adapterdeck.registry.settings import RegistrySettings
from adapterdeck.registry.validate import PublishRefused

__all__ = [
    "Conflict",
    "InvalidRef",
    "NotFound",
    "PublishRefused",
    "Ref",
    "Registry",
    "RegistrySettings",
    "StorageFault",
    "VersionInfo",
    "parse_ref",
]
