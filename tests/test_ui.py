"""The web dashboard at /ui, in a real browser: headless Chromium from the system packages
(/usr/bin/chromium) driven by Playwright (no browser download), against a real gateway with a
fine-tuning worker, in front of the session's real vLLM server.

Every test signs in through the form, collects the browser console's errors (there must be none on
a page that worked), and saves screenshots under out/test-screenshots/ui/.
"""

from __future__ import annotations

import json
import re
import shutil
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from adapterdeck.core.demo import write_demo_dataset
from adapterdeck.registry import Registry, RegistrySettings
from adapterdeck.registry.tenants import create_key
from adapterdeck.serve.ui.render import number

from .conftest import free_port
from .gateway_helpers import ServeProcess, launch, wait_ready
from .registry_helpers import claim_vllm, make_lora

pytestmark = pytest.mark.vllm

ROOT = Path(__file__).resolve().parent.parent
SHOTS = ROOT / "out" / "test-screenshots" / "ui"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
A, B = "uiacme", "uiglobex"  # tenants of this module only (the vLLM home is shared)
HOSTILE = '<img src=x onerror="window.__pwned=1">'


@dataclass
class Ui:
    url: str
    served: str  # the base's model name (vLLM's: the base's path)
    keys: dict[str, str]
    registry: Registry
    process: ServeProcess
    data: Path

    def api(self, method: str, path: str, who: str = A, **kw: Any) -> httpx.Response:
        headers = {"Authorization": f"Bearer {self.keys[who]}"}
        return httpx.request(method, f"{self.url}{path}", headers=headers, timeout=60, **kw)


def _run_dir(adapter: Path, out: Path) -> Path:
    """A run directory (adapter/ + report.json) whose report has loss curves, metrics, and a sample
    whose tuned output is markup: what a model may well answer."""
    shutil.copytree(adapter, out / "adapter")
    report = {
        "status": "succeeded",
        "training": {
            "stop_reason": "completed", "steps": 4, "planned_steps": 4, "epochs": 1.0,
            "train_loss": [{"step": s, "loss": 3.0 - 0.5 * s} for s in range(1, 5)],
            "val_loss": [{"step": 2, "loss": 2.4}, {"step": 4, "loss": 1.6}],
        },
        "test": {
            "examples": 2, "base_shots": 0,
            "metrics": {"exact_match": {"higher_is_better": True, "base": {"value": 0.0},
                                        "tuned": {"value": 0.5}, "delta": 0.5}},
        },
        "samples": [{"line": 7, "prompt": "Say hi", "reference": "hi", "base": "hello", "tuned": HOSTILE}],
        "data": {"format": "chat", "sha256": "ab" * 32, "files": [],
                 "sizes": {"train": 8, "validation": 2, "test": 2}},
    }  # fmt: skip
    (out / "report.json").write_text(json.dumps(report))
    return out


@pytest.fixture(scope="module")
def ui(
    base_model: Path, vllm_home: Path, vllm_server: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Ui]:
    root = tmp_path_factory.mktemp("ui")
    registry = Registry(RegistrySettings(home=vllm_home))
    loras = [claim_vllm(make_lora(base_model, root / f"lora{i}", seed=60 + i), base_model) for i in range(3)]
    registry.publish(loras[0], f"{A}/reply")
    registry.publish(_run_dir(loras[1], root / "run1"), f"{A}/reply")
    registry.set_alias(f"{A}/reply", "prod", 1)
    registry.publish(loras[2], f"{B}/secret-plan", alias="prod")
    keys = {A: create_key(registry, A), B: create_key(registry, B), "admin": create_key(registry, None)}
    config = root / "serve.yaml"
    finetune = {"workers": 1, "heartbeat_seconds": 0.5, "lease_seconds": 6, "poll_seconds": 0.5}
    config.write_text(yaml.safe_dump({"finetune": finetune}))
    port = free_port()
    args = [
        "--base", base_model, "--served-name", str(base_model), "--port", str(port),
        "--vllm-url", vllm_server, "--config", config,
    ]  # fmt: skip
    process = launch("serve", args, {"ADAPTERDECK_HOME": str(vllm_home)}, root / "gateway.log")
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(process, url, timeout=120, interval=0.3, what="gateway")
        yield Ui(url, str(base_model), keys, registry, process, root)
    finally:
        process.stop(timeout=90)
        registry.close()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    sync_api = pytest.importorskip("playwright.sync_api")
    assert Path(CHROMIUM).exists(), "Chromium is missing: apt-get install chromium (make test does)"
    with sync_api.sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield chromium
        chromium.close()


@dataclass
class Session:
    """One signed-in browser context, with every console error and page error it saw."""

    context: Any
    page: Any
    errors: list[str] = field(default_factory=list)
    seen: list[str] = field(default_factory=list)  # the HTML of every page visited

    def visit(self, url: str) -> str:
        response = self.page.goto(url)
        assert response is not None and response.status == 200, (url, response and response.status)
        return self.remember()

    def remember(self) -> str:
        self.page.wait_for_load_state("networkidle")
        html = self.page.content()
        self.seen.append(html)
        return html

    def shot(self, name: str) -> None:
        SHOTS.mkdir(parents=True, exist_ok=True)
        self.page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)

    def no_console_errors(self) -> None:
        assert self.errors == [], self.errors


def sign_in(browser: Any, ui: Ui, who: str, width: int = 1280) -> Session:
    context = browser.new_context(viewport={"width": width, "height": 900})
    page = context.new_page()
    session = Session(context, page)
    page.on("console", lambda m: session.errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: session.errors.append(str(e)))
    page.goto(f"{ui.url}/ui/")
    assert "/ui/login" in page.url
    page.get_by_label("API key").fill(ui.keys[who])
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_url(re.compile(r"/ui/adapters$"))
    return session


def _walk(ui: Ui, s: Session, tenant: str, name: str) -> None:
    """Every page the tenant's own adapter leads to, and every section."""
    s.visit(f"{ui.url}/ui/adapters")
    s.page.get_by_role("link", name=f"{tenant}/{name}").click()
    s.remember()
    s.visit(f"{ui.url}/ui/adapters/{tenant}/{name}/versions/1")
    for section in ("jobs", "experiments", "serving", "playground"):
        s.visit(f"{ui.url}/ui/{section}")


def test_sign_in_shows_each_tenant_only_its_own_and_the_admin_everything(browser: Any, ui: Ui) -> None:
    acme = sign_in(browser, ui, A)
    _walk(ui, acme, A, "reply")
    acme.shot("adapters-tenant")
    assert all(B not in html and "secret-plan" not in html for html in acme.seen)
    # Another tenant's pages answer as the API does: not found, and nothing of theirs shown.
    # (the same page as for an adapter that does not exist: only the name asked for is repeated).
    response = acme.page.goto(f"{ui.url}/ui/adapters/{B}/secret-plan")
    foreign = acme.page.inner_text(".error")
    assert response.status == 404 and acme.page.goto(f"{ui.url}/ui/adapters/{B}/no-such").status == 404
    assert acme.page.inner_text(".error") == foreign.replace("secret-plan", "no-such")
    acme.errors.clear()  # the 404 itself is a console error; nothing else was

    globex = sign_in(browser, ui, B)
    _walk(ui, globex, B, "secret-plan")
    assert all(A not in html for html in globex.seen)
    globex.no_console_errors()

    admin = sign_in(browser, ui, "admin")
    html = admin.visit(f"{ui.url}/ui/adapters")
    assert f"{A}/reply" in html and f"{B}/secret-plan" in html
    admin.visit(f"{ui.url}/ui/serving")
    assert admin.page.locator("#replicas tbody tr").count() == 1
    assert admin.page.inner_text("#replicas").count("ready") == 1
    admin.shot("serving-admin")
    admin.no_console_errors()

    # The session cookie: HTTP-only, SameSite=Strict, only for /ui; signing out ends it.
    (cookie,) = [c for c in acme.context.cookies() if c["name"] == "adapterdeck_ui"]
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict" and cookie["path"] == "/ui"
    assert acme.page.evaluate("document.cookie") == ""
    acme.visit(f"{ui.url}/ui/adapters")
    acme.page.get_by_role("button", name="Sign out").click()
    acme.page.wait_for_url(re.compile(r"/ui/login$"))
    acme.page.goto(f"{ui.url}/ui/jobs")
    assert "/ui/login" in acme.page.url
    for s in (acme, globex, admin):
        s.context.close()


def test_a_bad_key_is_refused_and_pages_need_a_session(browser: Any, ui: Ui) -> None:
    context = browser.new_context()
    page = context.new_page()
    page.goto(f"{ui.url}/ui/login")
    page.get_by_label("API key").fill("adk-not-a-key")
    page.get_by_role("button", name="Sign in").click()
    assert "That key is not valid." in page.inner_text("[role=alert]")
    page.screenshot(path=str(SHOTS / "login-refused.png"))
    # Without a session every page sends the browser to sign in (and back afterwards).
    page.goto(f"{ui.url}/ui/adapters/{A}/reply")
    assert page.url.endswith(f"/ui/login?next=/ui/adapters/{A}/reply")
    page.get_by_label("API key").fill(ui.keys[A])
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_url(re.compile(rf"/ui/adapters/{A}/reply$"))
    # A "next" off this dashboard is ignored.
    reply = httpx.post(f"{ui.url}/ui/login", data={"key": ui.keys[A], "next": "//evil.example/x"})
    assert reply.status_code == 303 and reply.headers["location"] == "/ui/adapters"
    context.close()


def test_a_version_page_shows_its_report_and_markup_stays_text(browser: Any, ui: Ui) -> None:
    s = sign_in(browser, ui, A, width=390)  # a phone's width
    html = s.visit(f"{ui.url}/ui/adapters/{A}/reply/versions/2")
    assert s.page.locator(".chart canvas").count() >= 1  # the loss curves, drawn from the steps
    assert s.page.locator("#metrics tbody tr").count() == 1
    assert s.page.locator("pre.output", has_text=HOSTILE).count() == 1  # shown as text
    assert "&lt;img src=x" in html and s.page.locator("main img").count() == 0
    assert s.page.evaluate("window.__pwned") is None
    s.shot("version-report-phone")
    s.no_console_errors()

    # The playground adds streamed text as text: a model's markup never becomes elements. (The
    # tiny random model cannot be made to answer markup on demand, so this one response is
    # replaced in the browser; every other playground request in these tests is real.)
    body = "".join(f"data: {json.dumps(e)}\n\n" for e in ({"text": HOSTILE}, {"done": True}))
    s.page.route("**/ui/playground/stream", lambda route: route.fulfill(
        status=200, headers={"content-type": "text/event-stream"}, body=body))  # fmt: skip
    s.visit(f"{ui.url}/ui/playground")
    s.page.get_by_label("Prompt").fill("Answer with markup")
    s.page.get_by_role("button", name="Send").click()
    s.page.wait_for_selector("#answer-0[data-state=done]")
    assert s.page.inner_text("#answer-0 .answer-text") == HOSTILE
    assert s.page.locator("#answers img").count() == 0 and s.page.evaluate("window.__pwned") is None
    s.no_console_errors()
    s.context.close()


def test_the_playground_streams_the_base_and_an_adapter_side_by_side(browser: Any, ui: Ui) -> None:
    s = sign_in(browser, ui, A)
    s.visit(f"{ui.url}/ui/playground")
    s.page.get_by_label("Prompt").fill("Hi, the courier lost my parcel.")
    s.page.get_by_label("Model 1").select_option(ui.served)
    s.page.get_by_label("Model 2").select_option(f"{A}/reply@1")
    s.page.get_by_label("Model 3").select_option(f"{A}/reply@2")
    s.page.get_by_role("button", name="Send").click()
    for i in range(3):
        s.page.wait_for_selector(f"#answer-{i}[data-state=done]", timeout=120_000)
        assert s.page.inner_text(f"#answer-{i} .answer-text").strip()
    assert s.page.inner_text("#answer-1 .answer-model") == f"{A}/reply@1"
    s.shot("playground")
    s.no_console_errors()
    # The stream is the API's: another tenant's adapter is not found, shown as the answer's error.
    s.page.get_by_label("Model 1").select_option(ui.served)
    s.page.evaluate(
        """() => { const o = document.createElement('option');
                   o.value = o.textContent = 'uiglobex/secret-plan';
                   document.getElementById('model-2').append(o); }"""
    )
    s.page.get_by_label("Model 3").select_option(f"{B}/secret-plan")
    s.page.get_by_role("button", name="Send").click()
    s.page.wait_for_selector("#answer-2[data-state=error]", timeout=60_000)
    assert "does not exist" in s.page.inner_text("#answer-2 .answer-status")
    s.context.close()


def _accept_dialogs(s: Session) -> list[str]:
    asked: list[str] = []

    def answer(dialog: Any) -> None:
        asked.append(dialog.message)
        dialog.accept()

    s.page.on("dialog", answer)
    return asked


def test_moving_an_alias_asks_first_and_needs_the_admin(browser: Any, ui: Ui) -> None:
    acme = sign_in(browser, ui, A)
    acme.visit(f"{ui.url}/ui/adapters/{A}/reply")
    assert acme.page.locator("#move-alias").count() == 0  # a tenant cannot move aliases
    acme.context.close()
    admin = sign_in(browser, ui, "admin")
    admin.visit(f"{ui.url}/ui/adapters/{A}/reply")
    admin.page.once("dialog", lambda d: d.dismiss())  # "no": nothing moves
    admin.page.get_by_label("to version").select_option("2")
    admin.page.get_by_role("button", name="Move").click()
    assert ui.registry.resolve(f"{A}/reply:prod").version == 1
    asked = _accept_dialogs(admin)
    admin.page.get_by_role("button", name="Move").click()
    admin.page.wait_for_load_state("networkidle")
    assert asked and ui.registry.resolve(f"{A}/reply:prod").version == 2
    assert "prod" in admin.page.inner_text("#alias-history tbody tr:first-child")
    ui.registry.set_alias(f"{A}/reply", "prod", 1)
    admin.no_console_errors()
    admin.context.close()


def _experiment_traffic(ui: Ui, n: int = 40, **settings: Any) -> None:
    definition = {
        "name": f"{A}/reply", "control": "v1", "candidates": [{"ref": "v2", "weight": 50}], **settings
    }  # fmt: skip
    created = ui.api("POST", "/v1/experiments", json=definition)
    assert created.status_code == 201, created.text
    for i in range(n):
        reply = ui.api("POST", "/v1/chat/completions", json={
            "model": f"{A}/reply", "user": f"user-{i}", "max_tokens": 2,
            "messages": [{"role": "user", "content": "Hello"}]})  # fmt: skip
        assert reply.status_code == 200, reply.text
        variant = reply.headers["x-adapterdeck-variant"]
        thumbs = "up" if (variant == "v2") == (i % 4 != 0) else "down"
        assert ui.api(
            "POST", "/v1/feedback", json={"response_id": reply.json()["id"], "thumbs": thumbs}
        ).is_success


class _Forger(BaseHTTPRequestHandler):
    """Another site's page that posts a form to the dashboard as soon as it loads."""

    target = ""

    def do_GET(self) -> None:
        page = (f'<form id=f method=post action="{self.target}"><input name=csrf value=guess></form>'
                "<script>document.getElementById('f').submit()</script>")  # fmt: skip
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.end_headers()
        self.wfile.write(page.encode())

    def log_message(self, *args: Any) -> None:
        pass


RAILS = [{"metric": "error_rate", "margin": 0.05}, {"metric": "json_valid", "margin": 0.1}]


def _scored_report(ui: Ui, evaluator: str, timeout: float = 30) -> dict[str, Any]:
    """The experiment's report once the live evaluator has scored answers of every variant (the
    gateway scores them when it writes the requests, in its flush)."""
    deadline = time.monotonic() + timeout
    while True:
        report = ui.api("GET", f"/v1/experiments/{A}/reply").json()
        live = report["live_evaluators"]
        if live and all(scores[evaluator]["scored"] > 0 for scores in live.values()):
            return report
        assert time.monotonic() < deadline, f"no live {evaluator} scores after {timeout} s: {live}"
        time.sleep(0.5)


def test_an_experiment_page_shows_the_verdict_and_its_actions_work(browser: Any, ui: Ui) -> None:
    _experiment_traffic(ui, guardrails=RAILS, evaluators=["json_valid"], eval_sample=1.0)
    report = _scored_report(ui, "json_valid")
    s = sign_in(browser, ui, A)
    s.visit(f"{ui.url}/ui/experiments")
    s.page.get_by_role("link", name=f"{A}/reply").click()
    s.remember()
    assert s.page.inner_text("#verdict").startswith(("v2 better than v1", "no significant difference"))
    assert s.page.locator("#variants tbody tr").count() == 2
    assert s.page.locator(".chart canvas").count() == 2  # the traffic split and the ratings
    # The ratings' always-valid figures (what the verdict rests on) beside the fixed-horizon p.
    seq = report["variants"][1]["vs_control"]["sequential"]
    candidate = s.page.inner_text("#variants tbody tr:nth-child(2)")
    assert f"ratings: always-valid p={number(seq['feedback_p'])}, 95% CI [" in candidate, (seq, candidate)
    assert "fixed-horizon" in candidate
    # One row per (candidate, guardrail), each with its status; none breached (the page is live).
    rails = s.page.locator("#guardrails tbody tr")
    assert rails.count() == len(RAILS) == len(report["guardrails"])
    for i, rail in enumerate(report["guardrails"]):
        cells = rails.nth(i).locator("td").all_inner_texts()
        assert cells[:3] == [rail["metric"], "v2", number(rail["margin"])], cells
        assert cells[-1] == rail["status"] and rail["status"] in ("holds", "not enough data"), rail
    # The live evaluator's mean and number scored, per variant.
    live = s.page.locator("#live-evaluators tbody tr")
    assert live.count() == 2 and "json_valid (mean, scored)" in s.page.inner_text("#live-evaluators thead")
    for i, (variant, scores) in enumerate(report["live_evaluators"].items()):
        cells = live.nth(i).locator("td").all_inner_texts()
        figures = scores["json_valid"]
        assert cells == [variant, f"{number(figures['mean'])} ({figures['scored']})"], (cells, figures)
        assert figures["scored"] > 0
    # The sample ratio check: the split matches the weights, with its p.
    srm = report["srm"]
    assert srm["p"] is not None and not srm["mismatch"], srm
    assert s.page.inner_text("#srm") == (
        f"Sample ratio: the requests split as the weights say (p={number(srm['p'])})."
    )
    print(f"experiment page: guardrails {[g['status'] for g in report['guardrails']]}, "
          f"live json_valid {report['live_evaluators']}, srm {srm['observed']} p={srm['p']:.3g}, "
          f"always-valid p={seq['feedback_p']:.3g}")  # fmt: skip
    s.shot("experiment")
    s.no_console_errors()

    # A form another site posts is refused, and the experiment keeps running.
    _Forger.target = f"{ui.url}/ui/experiments/{A}/reply/stop"
    forger = ThreadingHTTPServer(("127.0.0.1", free_port()), _Forger)
    threading.Thread(target=forger.serve_forever, daemon=True).start()
    try:
        s.page.goto(f"http://127.0.0.1:{forger.server_port}/")
        s.page.wait_for_url(re.compile(r"/ui/experiments/.*/stop$"))
        assert "nothing was changed" in s.page.inner_text("main")
    finally:
        forger.shutdown()
    assert ui.api("GET", f"/v1/experiments/{A}/reply").json()["status"] == "running"
    # The same request without the page's form token, from a script: refused too.
    forged = httpx.post(f"{ui.url}/ui/experiments/{A}/reply/stop", cookies={"adapterdeck_ui": ui.keys[A]})
    assert forged.status_code == 403

    s.errors.clear()
    asked = _accept_dialogs(s)
    s.visit(f"{ui.url}/ui/experiments/{A}/reply")
    s.page.get_by_label("weight", exact=True).fill("80")
    s.page.get_by_role("button", name="Set weight").click()
    s.page.wait_for_load_state("networkidle")
    assert ui.api("GET", f"/v1/experiments/{A}/reply").json()["variants"][1]["weight"] == 80
    s.page.get_by_label("Variant", exact=True).last.select_option("v2")
    s.page.get_by_role("button", name="Promote").click()
    s.page.wait_for_load_state("networkidle")
    assert len(asked) == 2 and "promoted" in s.page.inner_text("h1")
    assert ui.registry.resolve(f"{A}/reply:prod").version == 2
    assert "promote" in s.page.inner_text("#history")
    ui.registry.set_alias(f"{A}/reply", "prod", 1)
    s.no_console_errors()
    # The other tenant cannot open it.
    other = sign_in(browser, ui, B)
    assert other.page.goto(f"{ui.url}/ui/experiments/{A}/reply").status == 404
    s.context.close()
    other.context.close()


def test_a_job_started_from_the_page_trains_and_its_curve_and_report_show(browser: Any, ui: Ui) -> None:
    s = sign_in(browser, ui, A)
    s.visit(f"{ui.url}/ui/jobs")
    # A bad file: every bad line is named on the page (file name and lines as text), no job starts.
    bad = ui.data / f"{HOSTILE}.jsonl"
    bad.write_text('{"messages": []}\nnot json\n')
    s.page.get_by_label("Training file").set_input_files(str(bad))
    s.page.get_by_role("button", name="Upload and start").click()
    s.page.wait_for_selector("#problem")
    problem = s.page.inner_text("#problem")
    assert "line 1" in problem and "line 2" in problem and s.page.evaluate("window.__pwned") is None
    assert ui.api("GET", "/v1/fine_tuning/jobs").json()["data"] == []
    s.shot("job-bad-file")
    assert s.errors == ["Failed to load resource: the server responded with a status of 400 (Bad Request)"]
    s.errors.clear()  # the page's own 400: the refused upload

    good = write_demo_dataset(ui.data / "sentiment.jsonl", task="sentiment", n=60, seed=1)
    s.page.get_by_label("Training file").set_input_files(str(good))
    s.page.get_by_label("Suffix").fill("fromui")
    s.page.get_by_label("Epochs").fill("1")
    s.page.get_by_role("button", name="Upload and start").click()
    s.page.wait_for_url(re.compile(r"/ui/jobs/ftjob-"))
    job_url = s.page.url
    # A second job, cancelled from its page while the first trains.
    s.visit(f"{ui.url}/ui/jobs")
    s.page.get_by_label("Training file").set_input_files(str(good))
    s.page.get_by_role("button", name="Upload and start").click()
    s.page.wait_for_url(re.compile(r"/ui/jobs/ftjob-"))
    asked = _accept_dialogs(s)
    s.page.get_by_role("button", name="Cancel job").click()
    s.page.wait_for_selector("#job-status:has-text('cancelled')")
    assert asked

    # The first one: the page follows it live until it succeeds.
    s.visit(job_url)
    started = time.monotonic()
    s.page.wait_for_selector("#job-status:has-text('succeeded')", timeout=600_000)
    events = s.page.inner_text("#events")
    assert s.page.locator("#job-curves").count() == 1, events
    assert s.page.locator(".chart canvas").count() >= 1
    assert s.page.locator("#events li").count() >= 3
    model = s.page.inner_text("#fine-tuned-model")
    assert model.startswith(f"ft:{ui.served}:{A}:fromui:")
    s.shot("job-succeeded")
    print(f"job page followed the job to the end in {time.monotonic() - started:.0f} s")
    # Its version page: the run report of a real training run.
    s.page.locator("#job-facts a").click()
    s.remember()
    s.page.locator("#versions a").first.click()
    s.remember()
    assert s.page.locator(".chart canvas").count() >= 1 and s.page.locator("#metrics tbody tr").count() >= 1
    s.shot("version-report")
    s.no_console_errors()
    s.context.close()


def test_the_dashboard_can_be_switched_off(
    base_model: Path, vllm_server: str, vllm_home: Path, tmp_path: Path
) -> None:
    config = tmp_path / "serve.yaml"
    config.write_text("ui: false\n")
    port = free_port()
    args = ["--base", base_model, "--served-name", str(base_model), "--port", str(port),
            "--vllm-url", vllm_server, "--config", config, "--workers", "0"]  # fmt: skip
    process = launch("serve", args, {"ADAPTERDECK_HOME": str(vllm_home)}, tmp_path / "gateway.log")
    try:
        wait_ready(process, f"http://127.0.0.1:{port}", timeout=120, interval=0.3, what="gateway")
        assert httpx.get(f"http://127.0.0.1:{port}/ui/login").status_code == 404
        assert httpx.get(f"http://127.0.0.1:{port}/ui/static/ui.js").status_code == 404
    finally:
        process.stop()
