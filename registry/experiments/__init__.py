"""A/B experiments on a public name: the definition and bucket assignment (``model``), the
database rules (``store``), the statistics (``stats``) and ``adapterdeck experiment`` (``cli``)."""

from adapterdeck.registry.experiments.model import (
    BASE,
    BUCKETS,
    CANDIDATE,
    CONTROL,
    PROMOTED,
    RUNNING,
    SHADOW,
    STOPPED,
    THUMBS,
    Experiment,
    ExperimentError,
    Variant,
    parse_candidate,
    rebalance,
)
from adapterdeck.registry.experiments.stats import ALPHA, MIN_SAMPLES, Stats, compare, summarize
from adapterdeck.registry.experiments.store import Experiments

__all__ = [
    "ALPHA",
    "BASE",
    "BUCKETS",
    "CANDIDATE",
    "CONTROL",
    "MIN_SAMPLES",
    "PROMOTED",
    "RUNNING",
    "SHADOW",
    "STOPPED",
    "THUMBS",
    "Experiment",
    "ExperimentError",
    "Experiments",
    "Stats",
    "Variant",
    "compare",
    "parse_candidate",
    "rebalance",
    "summarize",
]
