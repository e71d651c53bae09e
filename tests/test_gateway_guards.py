"""What one client may cost the gateway and learn through it (issue 13): uploads authenticated
before their body is read, bounded headers and read timeouts, deep JSON, the timing of another
tenant's fine-tuned names, each tenant's prefix-cache salt, prompts x n, clients that hang up,
what /health tells without a key, a taken vLLM port.

A real ``adapterdeck serve`` gateway in a subprocess, in front of a recording stand-in for vLLM
(an HTTP server that answers like vLLM's OpenAI server and keeps every request it gets), so the
tests see exactly what the gateway sends to its engine.
"""

from __future__ import annotations

import json
import socket
import statistics
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import update

from adapterdeck.core.demo import write_demo_dataset
from adapterdeck.registry import Registry, RegistrySettings
from adapterdeck.registry import schema as t
from adapterdeck.registry.db import write_transaction
from adapterdeck.registry.finetune import fine_tuned_name
from adapterdeck.registry.tenants import create_key

from .conftest import free_port, run_cli
from .gateway_helpers import GatewayProcess, launch, start_gateway

ENGINE_KEY = "engine-key-for-the-tests"
HEAD_TIMEOUT = 2.0
BODY_TIMEOUT = 2.0
MiB = 1 << 20


class Engine(ThreadingHTTPServer):
    """Answers /health, /v1/models, /v1/chat/completions and /v1/completions like vLLM; keeps each
    POST."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _EngineHandler)
        self.calls: list[tuple[str, dict[str, str], dict[str, Any]]] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _EngineHandler(BaseHTTPRequestHandler):
    server: Engine

    def log_message(self, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        if self.path == "/v1/models":  # what the gateway checks at start: a vLLM serving its base
            model = {"id": "tiny", "object": "model", "owned_by": "vllm", "root": "tiny", "parent": None}
            self._answer(200, {"object": "list", "data": [model]})
            return
        self._answer(200, {}) if self.path == "/health" else self._answer(404, {"error": "no"})

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.calls.append((self.path, dict(self.headers), body))
        usage = {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}
        if body.get("stream"):
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.end_headers()
            chunk = {"id": "cmpl-1", "choices": [{"index": 0, "text": "x"}]}
            self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
            self.wfile.write(
                f"data: {json.dumps({'id': 'cmpl-1', 'choices': [], 'usage': usage})}\n\n".encode()
            )
            self.wfile.write(b"data: [DONE]\n\n")
            return
        choices = [{"index": 0, "text": "x", "message": {"role": "assistant", "content": "x"}}]
        self._answer(200, {"id": "cmpl-1", "model": body.get("model"), "choices": choices, "usage": usage})

    def _answer(self, status: int, payload: dict[str, Any]) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@dataclass
class Stack:
    gateway: GatewayProcess
    engine: Engine
    registry: Registry
    keys: dict[str, str]
    work: Path

    @property
    def port(self) -> int:
        return int(self.gateway.url.rsplit(":", 1)[1])

    def http(self, who: str | None) -> httpx.Client:
        headers = {"Authorization": f"Bearer {self.keys[who]}"} if who else {}
        return httpx.Client(base_url=self.gateway.url, headers=headers, timeout=60)

    def connect(self) -> socket.socket:
        return socket.create_connection(("127.0.0.1", self.port), timeout=10)

    def log(self) -> str:
        return self.gateway.log.read_text()


@pytest.fixture(scope="module")
def stack(base_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    work = tmp_path_factory.mktemp("guards")
    env = {"ADAPTERDECK_HOME": str(work / "home")}
    registry = Registry(RegistrySettings(home=work / "home"))
    keys = {"acme": create_key(registry, "acme"), "globex": create_key(registry, "globex")}
    keys["admin"] = create_key(registry, None)
    engine = Engine()
    threading.Thread(target=engine.serve_forever, daemon=True).start()
    config = {
        "vllm": {"api_key": ENGINE_KEY},
        "max_choices": 32,
        "http": {"head_timeout": HEAD_TIMEOUT, "body_timeout": BODY_TIMEOUT, "body_min_rate": 1024},
    }
    gateway = start_gateway(
        base_model, engine.url, env, work, config, served_name="tiny", ready=lambda r: r.status_code == 200
    )
    try:
        yield Stack(gateway, engine, registry, keys, work)
    finally:
        gateway.stop()
        engine.shutdown()
        engine.server_close()
        registry.close()


def _read_response(sock: socket.socket, timeout: float) -> bytes:
    """What the server sends until it closes the connection (or ``timeout`` passes)."""
    sock.settimeout(timeout)
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except TimeoutError:
        pass
    except ConnectionResetError:
        pass
    return data


# -- 2: uploads are authenticated before their body is read ----------------------------------------


def _upload_head(path: str, length: int, key: str | None = None) -> bytes:
    auth = f"Authorization: Bearer {key}\r\n" if key else ""
    return (
        f"POST {path} HTTP/1.1\r\nHost: x\r\n{auth}"
        f"Content-Type: multipart/form-data; boundary=b\r\nContent-Length: {length}\r\n\r\n"
    ).encode()


@pytest.mark.parametrize(
    ("path", "who", "status"),
    [
        ("/v1/files", None, 401),
        ("/v1/adapters/acme/big/versions", None, 401),
        ("/v1/files", "admin", 403),  # files belong to a tenant
        ("/v1/adapters/acme/big/versions", "acme", 403),  # publishing needs the admin key
    ],
)
def test_an_upload_is_refused_before_its_body_is_read(
    stack: Stack, path: str, who: str | None, status: int
) -> None:
    size = 100 * MiB
    chunk = b"x" * MiB
    sent = 0
    with stack.connect() as sock:
        started = time.perf_counter()
        sock.sendall(_upload_head(path, size, stack.keys[who] if who else None))
        sock.settimeout(0.05)
        # Keep sending the 100 MiB body until the answer arrives: it must come long before.
        answer = b""
        while sent < size and not answer:
            try:
                sock.sendall(chunk)
                sent += len(chunk)
                answer = sock.recv(65536, socket.MSG_PEEK)
            except TimeoutError:
                continue
            except (BrokenPipeError, ConnectionResetError):
                break
        answer = _read_response(sock, 5)
        elapsed = time.perf_counter() - started
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(f"HTTP/1.1 {status}".encode()), answer[:300]
    assert b"connection: close" in head.lower()
    assert json.loads(body)["error"]["message"]
    # Refused at once, with only what was already in flight read (socket buffers).
    assert elapsed < 2.0, elapsed
    assert sent < 32 * MiB, sent
    print(f"\n{path} as {who}: {status} after {elapsed * 1000:.0f} ms, {sent / MiB:.0f} MiB sent")


def test_an_authenticated_upload_still_works(stack: Stack) -> None:
    path = write_demo_dataset(stack.work / "ok.jsonl", task="sentiment", n=12, seed=1)
    with stack.http("acme") as http:
        reply = http.post(
            "/v1/files", files={"file": ("ok.jsonl", path.read_bytes())}, data={"purpose": "fine-tune"}
        )
    assert reply.status_code == 200, reply.text


# -- 3: bounded headers and read timeouts ----------------------------------------------------------


def _latencies_while(stack: Stack, attack: threading.Thread) -> list[float]:
    """Other clients' /health latencies (s) while ``attack`` runs."""
    latencies = []
    with httpx.Client(base_url=stack.gateway.url, timeout=30) as http:
        http.get("/health")
        attack.start()
        while attack.is_alive() or len(latencies) < 20:
            started = time.perf_counter()
            assert http.get("/health").status_code == 200
            latencies.append(time.perf_counter() - started)
            time.sleep(0.01)
    return latencies


def test_a_64_mib_header_is_refused_and_other_clients_are_not_held_up(stack: Stack) -> None:
    outcome: dict[str, Any] = {}

    def attack() -> None:
        with stack.connect() as sock:
            started = time.perf_counter()
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: ")
            sent = 0
            try:
                while sent < 64 * MiB:
                    sock.sendall(b"a" * MiB)
                    sent += MiB
                sock.sendall(b"\r\n\r\n")
            except (BrokenPipeError, ConnectionResetError):
                pass
            outcome["answer"] = _read_response(sock, 10)
            outcome["seconds"] = time.perf_counter() - started
            outcome["sent"] = sent

    latencies = _latencies_while(stack, threading.Thread(target=attack))
    assert outcome["answer"].startswith(b"HTTP/1.1 431"), outcome["answer"][:200]
    assert outcome["sent"] < 32 * MiB
    worst = max(latencies)
    print(
        f"\n64 MiB header: 431 after {outcome['seconds'] * 1000:.0f} ms; other clients' /health "
        f"p50 {statistics.median(latencies) * 1000:.1f} ms, max {worst * 1000:.1f} ms "
        f"({len(latencies)} requests)"
    )
    assert worst < 1.0, latencies


def test_too_many_headers_get_431(stack: Stack) -> None:
    headers = "".join(f"X-H{i}: v\r\n" for i in range(200))
    with stack.connect() as sock:
        sock.sendall(f"GET /health HTTP/1.1\r\nHost: x\r\n{headers}\r\n".encode())
        answer = _read_response(sock, 5)
    assert answer.startswith(b"HTTP/1.1 431"), answer[:200]
    assert b"more than 100 request headers" in answer


def test_unfinished_request_heads_are_dropped_after_the_head_timeout(stack: Stack) -> None:
    socks = []
    try:
        for _ in range(1000):
            sock = stack.connect()
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")  # never finished
            socks.append(sock)
        started = time.perf_counter()
        # Meanwhile the gateway serves everyone else.
        with httpx.Client(base_url=stack.gateway.url, timeout=10) as http:
            assert http.get("/health").status_code == 200
        closed = 0
        deadline = started + HEAD_TIMEOUT + 5
        for sock in socks:
            answer = _read_response(sock, max(0.1, deadline - time.perf_counter()))
            closed += answer.startswith(b"HTTP/1.1 408")
        assert closed == len(socks), f"{closed} of {len(socks)} closed with 408"
        print(f"\n1000 unfinished heads: all answered 408 within {time.perf_counter() - started:.1f} s")
    finally:
        for sock in socks:
            sock.close()


def test_a_body_at_one_byte_a_second_is_dropped(stack: Stack) -> None:
    with stack.connect() as sock:
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Authorization: Bearer {stack.keys['acme']}\r\nContent-Length: 1000\r\n\r\n".encode()
        )
        started = time.perf_counter()
        dropped_after = None
        try:
            for _ in range(30):
                sock.sendall(b" ")
                sock.settimeout(1.0)
                try:
                    if sock.recv(1024) == b"":
                        dropped_after = time.perf_counter() - started
                        break
                except TimeoutError:
                    pass
        except (BrokenPipeError, ConnectionResetError):
            dropped_after = time.perf_counter() - started
    assert dropped_after is not None and dropped_after < 2 * BODY_TIMEOUT + 2, dropped_after
    assert "its request body came at" in stack.log()


# -- 4: deep JSON ----------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
def test_deeply_nested_json_is_a_400(stack: Stack, path: str) -> None:
    body = '{"model": "tiny", "prompt": "x", "messages": ' + "[" * 5000 + "]" * 5000 + "}"
    with stack.http("acme") as http:
        reply = http.post(path, content=body, headers={"Content-Type": "application/json"})
    assert reply.status_code == 400, reply.text
    assert reply.json()["error"]["message"] == "The request body is nested too deeply."
    assert "RecursionError" not in stack.log()


# -- 6: another tenant's fine-tuned names cost the same, existing or not ---------------------------


def test_another_tenant_s_fine_tuned_names_take_the_same_time_existing_or_not(stack: Stack) -> None:
    path = write_demo_dataset(stack.work / "globex.jsonl", task="sentiment", n=12, seed=2)
    with stack.http("globex") as http:
        upload = http.post(
            "/v1/files", files={"file": ("g.jsonl", path.read_bytes())}, data={"purpose": "fine-tune"}
        ).json()["id"]
        job = http.post("/v1/fine_tuning/jobs", json={"model": "tiny", "training_file": upload}).json()
    existing = fine_tuned_name("tiny", "globex", None, job["id"])
    with write_transaction(stack.registry.engine) as conn:  # as a worker would on success
        conn.execute(
            update(t.ft_jobs).values(
                status="succeeded", fine_tuned_model=existing, result_ref="globex/ft-x@1"
            )
        )
    unknown = existing[:-4] + "zzzz"

    def call(http: httpx.Client, model: str) -> float:
        started = time.perf_counter()
        reply = http.post(
            "/v1/chat/completions", json={"model": model, "messages": [{"role": "user", "content": "hi"}]}
        )
        elapsed = time.perf_counter() - started
        assert reply.status_code == 404
        return elapsed

    with stack.http("acme") as http:
        for model in (existing, unknown):  # warm up: any cache is filled now
            call(http, model)
        times: dict[str, list[float]] = {existing: [], unknown: []}
        for _ in range(150):
            for model in (existing, unknown):
                times[model].append(call(http, model))
    a, b = statistics.median(times[existing]), statistics.median(times[unknown])
    print(f"\nanother tenant's ft: name: existing {a * 1000:.2f} ms, unknown {b * 1000:.2f} ms (medians)")
    assert 0.8 < a / b < 1.25, (a, b)


# -- 10: every engine request carries its tenant's cache salt --------------------------------------


def test_every_engine_request_carries_its_tenant_s_cache_salt_and_the_engine_key(stack: Stack) -> None:
    stack.engine.calls.clear()
    requests = [
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}),
        ("/v1/completions", {"prompt": "hi"}),
        ("/v1/completions", {"prompt": "hi", "stream": True}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "cache_salt": "guess"}),
    ]
    for who in ("acme", "globex", "admin"):
        with stack.http(who) as http:
            for path, body in requests:
                reply = http.post(path, json={"model": "tiny", **body})
                assert reply.status_code == 200, reply.text
    assert len(stack.engine.calls) == 3 * len(requests)
    salts: dict[int, set[str]] = {}
    for i, (_, headers, body) in enumerate(stack.engine.calls):
        assert headers["Authorization"] == f"Bearer {ENGINE_KEY}"
        salts.setdefault(i // len(requests), set()).add(body["cache_salt"])
    assert all(len(s) == 1 for s in salts.values()), salts  # one salt per tenant, whatever it sends
    assert len(set.union(*salts.values())) == 3  # and no two tenants share one
    assert "guess" not in set.union(*salts.values())


# -- 11: prompts x n -------------------------------------------------------------------------------


def test_prompts_times_n_is_bounded(stack: Stack) -> None:
    with stack.http("acme") as http:
        reply = http.post("/v1/completions", json={"model": "tiny", "prompt": ["hi"] * 100, "n": 8})
        assert reply.status_code == 400, reply.text
        error = reply.json()["error"]
        assert "max_choices" in error["message"] and "800 choices" in error["message"]
        assert error["param"] == "prompt"
        assert (
            http.post("/v1/completions", json={"model": "tiny", "prompt": ["hi"] * 4, "n": 8}).status_code
            == 200
        )
        tokens = http.post("/v1/completions", json={"model": "tiny", "prompt": [1] * 100, "n": 8})
        assert tokens.status_code == 200  # one prompt of 100 token ids


# -- 13: a client that hangs up mid-body -----------------------------------------------------------


def test_a_client_hanging_up_mid_body_is_one_log_line(stack: Stack) -> None:
    before = len(stack.log())
    for path in ("/v1/chat/completions", "/v1/completions"):
        with stack.connect() as sock:
            sock.sendall(
                f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n".encode()
                + f"Authorization: Bearer {stack.keys['acme']}\r\nContent-Length: 1000\r\n\r\n".encode()
                + b'{"model": "tiny", '
            )
            time.sleep(0.2)
    deadline = time.monotonic() + 10
    while stack.log()[before:].count("client disconnected") < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    new = stack.log()[before:]
    assert new.count("client disconnected before its request body was in") == 2, new
    assert "Traceback" not in new and "unexpected error" not in new, new


# -- 14: /health without the admin key -------------------------------------------------------------


def test_health_shows_details_to_the_admin_key_only(stack: Stack) -> None:
    for who in (None, "acme"):
        with stack.http(who) as http:
            reply = http.get("/health")
        assert reply.status_code == 200 and reply.json() == {"status": "ok"}
    with httpx.Client(base_url=stack.gateway.url, headers={"Authorization": "Bearer nope"}) as http:
        assert http.get("/health").json() == {"status": "ok"}
    with stack.http("admin") as http:
        report = http.get("/health").json()
    assert report["engines"]["vllm"]["url"] == stack.engine.url
    assert report["database"] == "ok" and "experiments" in report


# -- 16: a taken vLLM port -------------------------------------------------------------------------


def test_a_taken_vllm_port_fails_at_once_with_one_line(base_model: Path, tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        started = time.monotonic()
        result = run_cli(
            "serve", "--base", str(base_model), "--port", str(free_port()), "--vllm-port", str(port),
            "--workers", "0",
            env={"ADAPTERDECK_HOME": str(tmp_path / "home")},
        )  # fmt: skip
    assert result.returncode == 2, result.stdout + result.stderr
    assert time.monotonic() - started < 60
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and f"vLLM's port {port} on 127.0.0.1 is taken" in lines[0], result.stderr
    assert "--vllm-port" in lines[0]


@pytest.mark.vllm
def test_vllm_exiting_during_start_up_shows_the_end_of_its_log(base_model: Path, tmp_path: Path) -> None:
    config = tmp_path / "serve.yaml"
    config.write_text(json.dumps({"vllm": {"extra_args": ["--no-such-vllm-flag"], "restart_backoff": 60}}))
    log = tmp_path / "serve.log"
    args = [
        "--base", base_model, "--port", str(free_port()), "--vllm-port", str(free_port()), "--workers", "0",
        "--config", config,
    ]  # fmt: skip
    process = launch("serve", args, {"ADAPTERDECK_HOME": str(tmp_path / "home")}, log)
    try:
        deadline = time.monotonic() + 300
        while "during start-up" not in log.read_text() and time.monotonic() < deadline:
            time.sleep(1)
    finally:
        process.stop(timeout=60)
    text = log.read_text()
    assert "vLLM exited with 2 during start-up; the last lines of" in text, text[-3000:]
    after = text.split("during start-up", 1)[1]
    assert "--no-such-vllm-flag" in after, after[:3000]
