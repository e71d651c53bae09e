"""The extension points of adapterdeck: read this file first to write a plugin.

Every hook receives a small typed ``register`` object and calls it once per
thing the plugin adds; adapterdeck owns names, duplicates and errors. A hook may
be implemented by any module or object registered with the plugin manager:
the built-ins in ``adapterdeck.plugins`` and third-party packages exposing an
``adapterdeck`` entry point. All implementations are called (none "wins");
their return values are ignored, except for ``publish_run`` and ``fetch_adapter``, where the
first result wins.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    import typer

    from adapterdeck.core.plugins import (
        EvaluatorRegister,
        FormatRegister,
        MethodRegister,
        ObjectiveRegister,
        TrackerRegister,
    )

hookspec = pluggy.HookspecMarker("adapterdeck")
hookimpl = pluggy.HookimplMarker("adapterdeck")


@hookspec
def register_formats(register: FormatRegister) -> None:
    """Add data formats: call ``register.add_format(fmt)`` with a ``DataFormat`` for each."""


@hookspec
def register_methods(register: MethodRegister) -> None:
    """Add tuning methods: call ``register.add_method(method)`` with a ``TuningMethod`` for each."""


@hookspec
def register_objectives(register: ObjectiveRegister) -> None:
    """Add training objectives: call ``register.add_objective(objective)`` with a
    ``TrainingObjective`` for each."""


@hookspec
def register_evaluators(register: EvaluatorRegister) -> None:
    """Add evaluators: call ``register.add_evaluator(evaluator)`` with an ``Evaluator`` for each."""


@hookspec
def register_trackers(register: TrackerRegister) -> None:
    """Add experiment trackers: call ``register.add_tracker(tracker)`` with a ``Tracker`` for each."""


@hookspec
def register_commands(cli: typer.Typer) -> None:
    """Add commands or command groups to the ``adapterdeck`` command line (``cli.add_typer(...)``)."""


@hookspec(firstresult=True)
def publish_run(run_dir: Path, ref: str, alias: str | None) -> str | None:
    """Publish a finished run's adapter as ``ref`` (``tenant/name``); return the version ref it became.

    Called when a run config says ``publish: tenant/name``. The first implementation that returns
    a value wins; return None to leave it to another.
    """


@hookspec(firstresult=True)
def fetch_adapter(ref: str) -> tuple[str, Path] | None:
    """A published adapter as a local directory: ``(version_ref, path)`` for ``ref``.

    ``ref`` is ``tenant/name@N``, ``tenant/name:alias`` or ``tenant/name``; ``version_ref`` is
    the immutable ``tenant/name@N`` it means now. Called when a run config says
    ``init_adapter: REF`` (continued tuning). The first implementation that returns a value wins;
    return None to leave it to another, raise ``AdapterdeckError`` for a ref that names nothing.
    """
