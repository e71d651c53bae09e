"""Fine-tuning's names: job states, file purposes, ids, and the names a job's result is known by.

A job ``ftjob-<24 characters>`` publishes its result and checkpoints to the registry adapter
``tenant/ft-[suffix-]<short id>`` and names its model OpenAI's way, ``ft:BASE:TENANT:SUFFIX:<short
id>`` (a checkpoint adds ``:ckpt-step-N``).
"""

from __future__ import annotations

import secrets
import string
from datetime import datetime, timedelta

from adapterdeck.registry.db import utc

VALIDATING, QUEUED, RUNNING = "validating_files", "queued", "running"
SUCCEEDED, FAILED, CANCELLED = "succeeded", "failed", "cancelled"
ACTIVE = (VALIDATING, QUEUED, RUNNING)
FINISHED = (SUCCEEDED, FAILED, CANCELLED)
PURPOSE_TRAINING, PURPOSE_RESULTS = "fine-tune", "fine-tune-results"
FILE_PREFIX, JOB_PREFIX, EVENT_PREFIX, CHECKPOINT_PREFIX = "file-", "ftjob-", "ftevent-", "ftckpt-"
# A job left in validating_files this long (its gateway died mid-request) is failed by the sweep.
VALIDATION_TIMEOUT = timedelta(minutes=5)
_ALPHABET = string.ascii_lowercase + string.digits


def epoch(value: datetime | None) -> int | None:
    """Unix seconds, as the OpenAI API gives times."""
    stamped = utc(value)
    return int(stamped.timestamp()) if stamped is not None else None


def new_id(prefix: str) -> str:
    return prefix + "".join(secrets.choice(_ALPHABET) for _ in range(24))


def short_id(job_id: str) -> str:
    """The part of a job id that names its fine-tuned model (``ft:...:<short>``)."""
    return job_id.removeprefix(JOB_PREFIX)[:8]


def fine_tuned_name(model: str, tenant: str, suffix: str | None, job_id: str) -> str:
    """The OpenAI-style name of a job's result: ``ft:BASE:TENANT:SUFFIX:ID`` (SUFFIX may be empty)."""
    return f"ft:{model}:{tenant}:{suffix or ''}:{short_id(job_id)}"


def adapter_name(suffix: str | None, job_id: str) -> str:
    """The registry adapter (``tenant/<this>``) a job publishes its result and checkpoints to."""
    middle = f"{suffix.lower()}-" if suffix else ""
    return f"ft-{middle}{short_id(job_id)}"


def named_tenant(name: str) -> str | None:
    """The tenant a fine-tuned model name names: ``ft:BASE:TENANT:SUFFIX:ID[:ckpt-step-N]``."""
    parts = name.split(":")
    if parts and parts[-1].startswith("ckpt-step-"):
        parts = parts[:-1]
    return parts[-3] if len(parts) >= 5 and parts[0] == "ft" else None
