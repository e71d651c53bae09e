"""adapterdeck core: hook specifications, plugin manager, data, training, CLI.

What a plugin imports (docs/plugins.md): ``hookimpl`` from here, the base classes from
``adapterdeck.core.formats``, ``adapterdeck.core.methods``, ``adapterdeck.core.objectives``,
``adapterdeck.core.evaluators`` and ``adapterdeck.core.trackers``, the register types and the test
helpers from ``adapterdeck.core.plugins``, the errors from ``adapterdeck.core.errors``. Importing
this package stays cheap: plugin modules are imported at every command.
"""

from importlib import metadata

from adapterdeck.core.hookspecs import hookimpl

try:
    __version__ = metadata.version("adapterdeck")
except metadata.PackageNotFoundError:  # a source tree without an install
    __version__ = "0.0.0"

__all__ = ["__version__", "hookimpl"]
