"""The extension points of adapterdeck: read this file first to write a plugin.

Every hook receives a small typed ``register`` object and calls it once per
thing the plugin adds; adapterdeck owns names, duplicates and errors. A hook may
be implemented by any module or object registered with the plugin manager:
the built-ins in ``adapterdeck.plugins`` and third-party packages exposing an
``adapterdeck`` entry point. All implementations are called (none "wins");
their return values are ignored.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    from adapterdeck.core.plugins import EvaluatorRegister, FormatRegister, MethodRegister

hookspec = pluggy.HookspecMarker("adapterdeck")
hookimpl = pluggy.HookimplMarker("adapterdeck")


@hookspec
def register_formats(register: FormatRegister) -> None:
    """Add data formats: call ``register.add_format(fmt)`` with a ``DataFormat`` for each."""


@hookspec
def register_methods(register: MethodRegister) -> None:
    """Add tuning methods: call ``register.add_method(method)`` with a ``TuningMethod`` for each."""


@hookspec
def register_evaluators(register: EvaluatorRegister) -> None:
    """Add evaluators: call ``register.add_evaluator(evaluator)`` with an ``Evaluator`` for each."""
