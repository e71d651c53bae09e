"""Continued tuning: a run that starts from a published adapter's weights (``init_adapter``).

``init_adapter`` names a published version (``tenant/name@N``, ``tenant/name:alias``, resolved
once when the run starts, or ``tenant/name``) or an adapter directory. The run trains the same
method with the same parameters on the same base: each is checked, before any model loads, and a
mismatch is one error naming what differs. The new adapter records its parent (``parent.ref``
in ``adapterdeck.json`` and the report), which the registry keeps as the version's lineage.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from adapterdeck.core.adapters import AdapterInfo, read_adapter
from adapterdeck.core.basemodel import fingerprint
from adapterdeck.core.errors import AdapterdeckError
from adapterdeck.core.methods import MethodParams, TuningMethod
from adapterdeck.core.plugins import fetch_adapter

if TYPE_CHECKING:
    from peft import PeftModel

    from adapterdeck.core.config import RunConfig

# tenant/name, tenant/name@N or tenant/name:alias (the registry's grammar).
REGISTRY_REF = re.compile(r"^([^/\s:@]+)/[^/\s:@]+(@\d+|:[a-z][a-z0-9_-]*)?$")


@dataclass(frozen=True)
class Parent:
    """The adapter a run continues from."""

    ref: str  # the immutable tenant/name@N it resolved to, or the adapter directory
    info: AdapterInfo


def registry_tenant(init_adapter: str) -> str | None:
    """The tenant a registry ref names (None: ``init_adapter`` is a directory)."""
    if Path(init_adapter).exists():
        return None
    match = REGISTRY_REF.match(init_adapter)
    return match.group(1) if match else None


def tenant_problem(init_adapter: str, publish: str | None) -> str | None:
    """Why a run that publishes as ``publish`` may not continue from ``init_adapter``."""
    tenant = registry_tenant(init_adapter)
    if tenant is None or publish is None:
        return None
    target = publish.split("/", 1)[0]
    if tenant == target:
        return None
    return (
        f"{init_adapter} is tenant {tenant!r}'s adapter and this run publishes to tenant "
        f"{target!r}: a tenant continues only its own adapters"
    )


def find_parent(config: RunConfig, method: TuningMethod) -> Parent:
    """The run's ``init_adapter``, fetched and checked against the run's method and base."""
    value = config.init_adapter
    assert value is not None
    if Path(value).exists():
        ref, path = str(Path(value).resolve()), Path(value)
    elif REGISTRY_REF.match(value):
        ref, path = fetch_adapter(value)
    else:
        raise AdapterdeckError(
            f"init_adapter: {value!r} is neither an adapter directory nor tenant/name[@N|:alias]"
        )
    info = read_adapter(path)
    if info.method is None:
        raise AdapterdeckError(
            f"init_adapter: {ref} was not trained by adapterdeck (no method recorded); "
            "only a run's adapter can be continued"
        )
    if info.method != method.name:
        raise AdapterdeckError(
            f"init_adapter: {ref} is a {info.method} adapter and this run trains {method.name}; "
            f"set method.name: {info.method}"
        )
    theirs, ours = info.meta.get("base_fingerprint"), fingerprint(config.base)
    if theirs != ours:
        raise AdapterdeckError(
            f"init_adapter: {ref} was trained on base {info.base!r} (fingerprint {str(theirs)[:12]}), "
            f"not on this run's base {config.base!r} (fingerprint {ours[:12]})"
        )
    return Parent(ref, info)


def parent_params(config: RunConfig, method: TuningMethod, parent: Parent) -> MethodParams:
    """The parent's method parameters, which the continued run keeps; a parameter the run config
    sets to another value is an error."""
    recorded = method.params.model_validate(parent.info.params)
    asked = config.method_params()
    differ = [
        f"method.{key}: {getattr(asked, key)!r} (the parent's: {getattr(recorded, key)!r})"
        for key in (config.method.model_extra or {})
        if getattr(asked, key) != getattr(recorded, key)
    ]
    if differ:
        raise AdapterdeckError(
            f"init_adapter: {parent.ref} keeps its own method parameters; remove or match "
            + ", ".join(differ)
        )
    return recorded


def load_parent_weights(model: PeftModel, parent: Parent) -> None:
    """Put the parent's adapter weights into ``model``'s fresh adapter of the same shape."""
    from peft.utils import get_peft_model_state_dict, load_peft_weights, set_peft_model_state_dict

    weights = load_peft_weights(str(parent.info.path), device="cpu")
    own = get_peft_model_state_dict(model)
    missing = sorted(set(own) - set(weights))
    extra = sorted(set(weights) - set(own))
    shapes = sorted(k for k in set(own) & set(weights) if own[k].shape != weights[k].shape)
    if missing or extra or shapes:
        first = (missing or extra or shapes)[0]
        raise AdapterdeckError(
            f"init_adapter: {parent.ref}'s weights do not fit this run's adapter "
            f"({len(missing)} missing, {len(extra)} unexpected, {len(shapes)} of another shape; "
            f"first: {first})"
        )
    set_peft_model_state_dict(model, weights)


def parent_section(parent: Parent | None, start_val_loss: float | None) -> dict[str, Any] | None:
    """The report's ``parent``: the adapter the run continued from (its ref, method and data) and
    the validation loss the run started at (the parent's own, on the same validation data)."""
    if parent is None:
        return None
    meta = parent.info.meta
    return {
        "ref": parent.ref,
        "method": parent.info.method,
        "data_sha256": meta.get("data_sha256"),
        "objective": (meta.get("objective") or {}).get("name", "sft"),
        "grandparent": (meta.get("parent") or {}).get("ref"),
        "start_val_loss": start_val_loss,
    }
