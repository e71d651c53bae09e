"""What a replica tells about itself, read without trusting it: whether the server at a
``--vllm-url`` is a vLLM serving this gateway's base (its ``/v1/models``), and which adapters it
runs (``vllm:lora_requests_info`` in its ``/metrics``) and since when it runs (its process start
time, which says whether it restarted, and so forgot its adapters)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from adapterdeck.core.errors import AdapterdeckError
from adapterdeck.serve.settings import ServeSettings

LORA_INFO = "vllm:lora_requests_info"
START_TIME = "process_start_time_seconds"
CHECK_TIMEOUT = 5.0
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def base_names(settings: ServeSettings) -> set[str]:
    """The names a vLLM serving the gateway's base may list it under: its served name, the hub id
    or directory it was given, and that directory's full path."""
    names = {settings.base_name(), settings.base}
    path = Path(settings.base).expanduser()
    if path.exists():
        names.add(str(path.resolve()))
    return names


def models_problem(status: int, payload: Any, settings: ServeSettings) -> str | None:
    """Why an answer of ``GET /v1/models`` is not a vLLM serving the base (None: it is, or it cannot
    tell: a 401 is a key problem, told on every request)."""
    if status == 401:
        return None
    if status != 200:
        return f"it answers /v1/models with HTTP {status}: it is not a vLLM server"
    data = payload.get("data") if isinstance(payload, dict) else None
    if (
        not isinstance(data, list)
        or payload.get("object") != "list"
        or not all(isinstance(m, dict) and isinstance(m.get("id"), str) for m in data)
        or not all(m.get("owned_by") == "vllm" for m in data)
    ):
        return "its /v1/models is not vLLM's answer: it is not a vLLM server"
    bases = [m for m in data if not m.get("parent")]  # a LoRA's entry names its base as parent
    served = {m["id"] for m in bases} | {str(m["root"]) for m in bases if m.get("root")}
    wanted = base_names(settings)
    if not served & wanted:
        listed = ", ".join(sorted(served)) or "nothing"
        return f"it serves {listed}, not the base {settings.base_name()}"
    return None


def check_endpoints(settings: ServeSettings, key: str | None) -> list[str]:
    """Refuse (one line) a ``vllm.url``/``vllm.urls`` server that answers but is not a vLLM serving
    the base; return the ones that did not answer (they are checked again when they do)."""
    unreachable = []
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    for url in settings.vllm.endpoints():
        try:
            reply = httpx.get(f"{url}/v1/models", headers=headers, timeout=CHECK_TIMEOUT)
        except httpx.HTTPError:
            unreachable.append(url)
            continue
        try:
            payload = reply.json()
        except ValueError:
            payload = None
        problem = models_problem(reply.status_code, payload, settings)
        if problem is not None:
            raise AdapterdeckError(f"--vllm-url {url} is refused: {problem}")
    return unreachable


def _labels(text: str) -> dict[str, str]:
    return {
        k: v.replace('\\"', '"').replace("\\n", "\n").replace("\\\\", "\\") for k, v in _LABEL.findall(text)
    }


@dataclass
class ReplicaMetrics:
    """From one read of a vLLM's ``/metrics``: the adapters its latest scheduler step ran or queued,
    its LoRA slots (``max_lora``), and its process start time."""

    adapters: list[str] = field(default_factory=list)
    max_lora: int | None = None
    started: float | None = None


def parse_metrics(text: str) -> ReplicaMetrics:
    """vLLM keeps one ``vllm:lora_requests_info`` series per set of adapters it ever ran, each set
    to the time it was last seen: the newest is now."""
    found = ReplicaMetrics()
    newest = -1.0
    for line in text.splitlines():
        if line.startswith(START_TIME + " "):
            try:
                found.started = float(line.split()[1])
            except (IndexError, ValueError):
                pass
        if not line.startswith(LORA_INFO + "{"):
            continue
        labels_text, _, value = line[len(LORA_INFO) + 1 :].rpartition("}")
        try:
            seen = float(value.split()[0])
        except (IndexError, ValueError):
            continue
        labels = _labels(labels_text)
        if labels.get("max_lora", "").isdigit():
            found.max_lora = int(labels["max_lora"])
        if seen > newest:
            newest = seen
            names = labels.get("running_lora_adapters", "").split(",")
            names += labels.get("waiting_lora_adapters", "").split(",")
            found.adapters = list(dict.fromkeys(n for n in names if n))
    return found
