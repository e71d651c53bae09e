"""adapterdeck core: hook specifications, plugin manager, data, training, CLI."""

from importlib import metadata

from adapterdeck.core.hookspecs import hookimpl

try:
    __version__ = metadata.version("adapterdeck")
except metadata.PackageNotFoundError:  # a source tree without an install
    __version__ = "0.0.0"

__all__ = ["__version__", "hookimpl"]
