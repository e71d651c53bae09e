"""The plugin manager: loads built-in and third-party plugins, collects what they register.

Load order is explicit: the built-ins in ``adapterdeck.plugins`` first, then the
``adapterdeck`` entry points of installed packages (narrowed by the environment
variable ``ADAPTERDECK_LOAD_PLUGINS``: a comma list of entry point or
distribution names; empty loads none). A plugin that fails to import, implements
an unknown hook or registers a name already taken is recorded as a problem; the
others still load.
"""

from __future__ import annotations

import difflib
import importlib
import os
import re
import traceback
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Generic, TypeVar

import pluggy

from adapterdeck.core import hookspecs
from adapterdeck.core.errors import AdapterdeckError, UnknownNameError
from adapterdeck.core.evaluators import Evaluator
from adapterdeck.core.formats import DataFormat
from adapterdeck.core.methods import ENGINES, TuningMethod
from adapterdeck.core.objectives import TrainingObjective
from adapterdeck.core.trackers import Tracker

ENTRY_POINT_GROUP = "adapterdeck"
LOAD_ENV = "ADAPTERDECK_LOAD_PLUGINS"
BUILTIN_PACKAGE = "adapterdeck.plugins"
OWN_DISTRIBUTION = "adapterdeck"
NAME_RE = re.compile(r"^[a-z][a-z0-9_.-]{0,63}$")

T = TypeVar("T")


@dataclass(frozen=True)
class Origin:
    """Where a plugin comes from."""

    plugin: str
    distribution: str | None = None
    version: str | None = None
    builtin: bool = False
    #: Where a problem comes from when it is no plugin's (the name of a setting), else None.
    setting: str | None = None

    @property
    def label(self) -> str:
        if self.setting:
            return self.setting
        if self.builtin:
            return "built-in"
        if self.distribution:
            return f"{self.distribution} {self.version}"
        return "registered in code"


@dataclass(frozen=True)
class Registered(Generic[T]):
    kind: str
    name: str
    obj: T
    origin: Origin


@dataclass(frozen=True)
class PluginProblem:
    plugin: str
    origin: Origin
    error: str


@dataclass
class Catalog:
    """Everything the loaded plugins registered, and what went wrong loading them."""

    formats: dict[str, Registered[DataFormat]] = field(default_factory=dict)
    methods: dict[str, Registered[TuningMethod]] = field(default_factory=dict)
    evaluators: dict[str, Registered[Evaluator]] = field(default_factory=dict)
    objectives: dict[str, Registered[TrainingObjective]] = field(default_factory=dict)
    trackers: dict[str, Registered[Tracker]] = field(default_factory=dict)
    problems: list[PluginProblem] = field(default_factory=list)

    def format(self, name: str) -> DataFormat:
        return self._lookup(self.formats, "format", name)

    def method(self, name: str) -> TuningMethod:
        return self._lookup(self.methods, "method", name)

    def evaluator(self, name: str) -> Evaluator:
        return self._lookup(self.evaluators, "evaluator", name)

    def objective(self, name: str) -> TrainingObjective:
        return self._lookup(self.objectives, "objective", name)

    def tracker(self, name: str) -> Tracker:
        return self._lookup(self.trackers, "tracker", name)

    def unknown(self, kind: str, name: str, *, failures: bool = True) -> UnknownNameError:
        """The error for an unknown ``kind`` (format, method, evaluator, objective, tracker) named
        ``name``: the known names, a close one, and (unless not ``failures``: the HTTP API does not
        show the server's plugin errors to tenants) the plugins that failed to load, where it may
        come from."""
        known = list(getattr(self, f"{kind}s"))
        close = difflib.get_close_matches(str(name), known, n=1, cutoff=0.6)
        failed = [
            f"{p.plugin} ({p.origin.label}): {p.error}"
            for p in self.problems
            if failures
            and p.error.startswith(("failed to import", "cannot register", f"register_{kind}s raised"))
        ]
        return UnknownNameError(kind, name, known, close=close[0] if close else None, failed=failed)

    def _lookup(self, table: dict[str, Registered[T]], kind: str, name: str) -> T:
        if name not in table:
            raise self.unknown(kind, name)
        return table[name].obj

    def entries(self) -> list[Registered[Any]]:
        """Every registered thing, formats first, each kind sorted by name."""
        out: list[Registered[Any]] = []
        for table in (self.formats, self.methods, self.objectives, self.evaluators, self.trackers):
            out.extend(table[k] for k in sorted(table))
        return out


class _Register:
    kind: str
    base: type

    def __init__(self, catalog: Catalog, table: dict[str, Registered[Any]], origin: Origin) -> None:
        self._catalog, self._table, self._origin = catalog, table, origin

    def _add(self, obj: Any) -> None:
        name = getattr(obj, "name", None)
        problem = None
        if not isinstance(obj, self.base):
            problem = f"registered {obj!r} as a {self.kind}, but it is not a {self.base.__name__}"
        elif not isinstance(name, str) or not NAME_RE.match(name):
            problem = f"{self.kind} name {name!r} is not valid (lowercase letters, digits, '_', '-', '.')"
        elif name in self._table:
            first = self._table[name].origin
            problem = f"{self.kind} {name!r} is already registered by {first.plugin} ({first.label})"
        else:
            problem = self._check(obj)
        if problem:
            self._catalog.problems.append(PluginProblem(self._origin.plugin, self._origin, problem))
            return
        self._table[name] = Registered(self.kind, name, obj, self._origin)

    def _check(self, obj: Any) -> str | None:
        return None


class FormatRegister(_Register):
    """Passed to ``register_formats``."""

    kind, base = "format", DataFormat

    def add_format(self, fmt: DataFormat) -> None:
        """Make ``fmt`` available under ``fmt.name``."""
        self._add(fmt)


class MethodRegister(_Register):
    """Passed to ``register_methods``."""

    kind, base = "method", TuningMethod

    def add_method(self, method: TuningMethod) -> None:
        """Make ``method`` available under ``method.name``."""
        self._add(method)

    def _check(self, obj: Any) -> str | None:
        engines = tuple(getattr(obj, "served_by", ()))
        unknown = [e for e in engines if e not in ENGINES]
        if not engines or unknown:
            return f"method {obj.name!r} must be served by some of {list(ENGINES)}, got {list(engines)}"
        return None


class EvaluatorRegister(_Register):
    """Passed to ``register_evaluators``."""

    kind, base = "evaluator", Evaluator

    def add_evaluator(self, evaluator: Evaluator) -> None:
        """Make ``evaluator`` available under ``evaluator.name``."""
        self._add(evaluator)


class ObjectiveRegister(_Register):
    """Passed to ``register_objectives``."""

    kind, base = "objective", TrainingObjective

    def add_objective(self, objective: TrainingObjective) -> None:
        """Make ``objective`` available under ``objective.name``."""
        self._add(objective)

    def _check(self, obj: Any) -> str | None:
        kinds = tuple(getattr(obj, "data_kinds", ()))
        if not kinds or not all(isinstance(k, str) and k for k in kinds):
            return f"objective {obj.name!r} must name the kinds of data it trains on, got {list(kinds)}"
        return None


class TrackerRegister(_Register):
    """Passed to ``register_trackers``."""

    kind, base = "tracker", Tracker

    def add_tracker(self, tracker: Tracker) -> None:
        """Make ``tracker`` available under ``tracker.name`` (``log: {<name>: ...}`` in run.yaml)."""
        self._add(tracker)


_HOOKS: tuple[tuple[str, type[_Register], str], ...] = (
    ("register_formats", FormatRegister, "formats"),
    ("register_methods", MethodRegister, "methods"),
    ("register_objectives", ObjectiveRegister, "objectives"),
    ("register_evaluators", EvaluatorRegister, "evaluators"),
    ("register_trackers", TrackerRegister, "trackers"),
)

_pm: pluggy.PluginManager | None = None
_origins: dict[str, Origin] = {}
_load_problems: list[PluginProblem] = []


def plugin_manager() -> pluggy.PluginManager:
    """The process-wide plugin manager, loading plugins on first use."""
    global _pm
    if _pm is None:
        _pm = pluggy.PluginManager(ENTRY_POINT_GROUP)
        _pm.add_hookspecs(hookspecs)
        _load_builtins(_pm)
        _load_entry_points(_pm, os.environ.get(LOAD_ENV))
    return _pm


def reset() -> None:
    """Forget every loaded plugin; the next call loads them again (for tests)."""
    global _pm
    _pm = None
    _origins.clear()
    _load_problems.clear()


def register_plugin(plugin: object, name: str | None = None) -> str:
    """Register a plugin object (a module or any object with hook implementations) in code."""
    pm = plugin_manager()
    registered = pm.register(plugin, name=name)
    if registered is None:
        raise ValueError(f"plugin {name or plugin!r} is already registered")
    _origins.setdefault(registered, Origin(registered))
    return registered


def unregister_plugin(name: str) -> None:
    plugin_manager().unregister(name=name)
    _origins.pop(name, None)


def _record(origin: Origin, error: str) -> None:
    _load_problems.append(PluginProblem(origin.plugin, origin, error))


def _register(pm: pluggy.PluginManager, obj: object, origin: Origin) -> None:
    try:
        pm.register(obj, name=origin.plugin)
    except Exception as exc:  # PluginValidationError, or a name clash
        _record(origin, f"cannot register: {exc}")
        return
    _origins[origin.plugin] = origin
    if not pm.get_hookcallers(obj):
        _record(origin, "implements no adapterdeck hook (is @hookimpl missing?)")


def _load_builtins(pm: pluggy.PluginManager) -> None:
    package = importlib.import_module(BUILTIN_PACKAGE)
    for module_name in package.BUILTIN_PLUGINS:
        origin = Origin(module_name, builtin=True)
        try:
            module = importlib.import_module(module_name)
        except Exception as exc:
            _record(origin, _describe(exc))
            continue
        _register(pm, module, origin)


def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _load_entry_points(pm: pluggy.PluginManager, wanted_env: str | None) -> None:
    wanted = None
    spelled: dict[str, str] = {}  # each wanted name as the variable spells it
    if wanted_env is not None:
        spelled = {_normalize(n.strip()): n.strip() for n in wanted_env.split(",") if n.strip()}
        wanted = set(spelled)
    seen: set[str] = set()
    for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
        dist = ep.dist
        dist_name = dist.metadata["Name"] if dist is not None else None
        # adapterdeck's own entry points (registry, serving) are part of it: always loaded.
        own = dist_name is not None and _normalize(dist_name) == OWN_DISTRIBUTION
        keys = {_normalize(ep.name)} | ({_normalize(dist_name)} if dist_name else set())
        if wanted is not None and not own and not keys & wanted:
            continue
        if not own:
            seen |= keys
        origin = Origin(
            f"{dist_name}:{ep.name}" if dist_name else ep.name,
            distribution=None if own else dist_name,
            version=None if own else (dist.version if dist is not None else None),
            builtin=own,
        )
        try:
            obj = ep.load()
        except BaseException as exc:  # a plugin's import must never stop the others
            if isinstance(exc, KeyboardInterrupt):
                raise
            _record(origin, _describe(exc))
            continue
        _register(pm, obj, origin)
    for name in sorted((wanted or set()) - seen):
        _record(
            Origin(spelled[name], setting=LOAD_ENV),
            f"{LOAD_ENV} names {spelled[name]!r}, but no installed plugin has that name "
            "(as an entry point or a distribution)",
        )


def _describe(exc: BaseException) -> str:
    frames = traceback.extract_tb(exc.__traceback__)
    where = f" ({frames[-1].filename}:{frames[-1].lineno})" if frames else ""
    return f"failed to import: {type(exc).__name__}: {exc}{where}"


def _impls_in_order(pm: pluggy.PluginManager, hook_name: str) -> list[Any]:
    """A hook's implementations in registration order, built-ins first."""
    order = {name: i for i, name in enumerate(_origins)}
    impls = getattr(pm.hook, hook_name).get_hookimpls()
    return sorted(impls, key=lambda i: order.get(i.plugin_name, len(order)))


def _call_each(
    pm: pluggy.PluginManager,
    hook_name: str,
    make_register: Callable[[Origin], _Register],
    catalog: Catalog,
) -> None:
    # One implementation at a time, in registration order (built-ins first, so they keep
    # their names, whatever tryfirst/trylast a plugin asks for), and a plugin whose hook
    # raises is reported without stopping the rest.
    for impl in _impls_in_order(pm, hook_name):
        origin = _origins.get(impl.plugin_name, Origin(impl.plugin_name))
        try:
            impl.function(make_register(origin))
        except Exception as exc:
            catalog.problems.append(
                PluginProblem(origin.plugin, origin, f"{hook_name} raised {type(exc).__name__}: {exc}")
            )


def _unknown_hooks(pm: pluggy.PluginManager) -> Iterable[PluginProblem]:
    spec_names = {name for name, _, _ in _HOOKS} | {"register_commands", "publish_run"}
    for name, caller in vars(pm.hook).items():
        if name in spec_names or not isinstance(caller, pluggy.HookCaller) or caller.has_spec():
            continue
        for impl in caller.get_hookimpls():
            origin = _origins.get(impl.plugin_name, Origin(impl.plugin_name))
            close = [s for s in spec_names if s.replace("_", "") in name.replace("_", "") or name in s]
            hint = f"; did you mean {close[0]!r}?" if close else ""
            yield PluginProblem(origin.plugin, origin, f"implements unknown hook {name!r}{hint}")


def catalog() -> Catalog:
    """Call every plugin's hooks and collect what they register."""
    pm = plugin_manager()
    cat = Catalog(problems=list(_load_problems))
    for hook_name, register_cls, table_name in _HOOKS:
        table = getattr(cat, table_name)
        _call_each(pm, hook_name, lambda o, c=register_cls, t=table: c(cat, t, o), cat)
    cat.problems.extend(_unknown_hooks(pm))
    return cat


def add_plugin_commands(cli: Any) -> list[PluginProblem]:
    """Let every plugin add its commands to the CLI; a plugin whose hook raises is skipped."""
    problems: list[PluginProblem] = []
    for impl in _impls_in_order(plugin_manager(), "register_commands"):
        origin = _origins.get(impl.plugin_name, Origin(impl.plugin_name))
        try:
            impl.function(cli)
        except Exception as exc:
            problems.append(PluginProblem(origin.plugin, origin, f"register_commands raised {exc!r}"))
    return problems


def publish_run(run_dir: Any, ref: str, alias: str | None = None) -> str:
    """Publish a run through the plugin that implements ``publish_run`` (the registry)."""
    result = plugin_manager().hook.publish_run(run_dir=run_dir, ref=ref, alias=alias)
    if result is None:
        raise AdapterdeckError(
            f"cannot publish {ref}: no installed plugin publishes runs (is the registry missing?)"
        )
    return result


def fetch_adapter(ref: str) -> tuple[str, Path]:
    """A published adapter's ``(tenant/name@N, local directory)`` through the plugin that
    implements ``fetch_adapter`` (the registry)."""
    result = plugin_manager().hook.fetch_adapter(ref=ref)
    if result is None:
        raise AdapterdeckError(
            f"cannot find {ref}: no installed plugin fetches published adapters (is the registry missing?)"
        )
    version_ref, path = result
    return version_ref, Path(path)
