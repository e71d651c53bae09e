"""``adapterdeck demo``: the whole product on one machine, offline.

Build the offline base, train the demo tenants' adapters, publish them, serve them through vLLM
behind the gateway, call each tenant's adapter and the base with the ``openai`` client, show the
answers side by side, run an A/B test of one adapter against the base on live rated traffic, and
shut everything down.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Annotated

import httpx
import typer
from rich.console import Console
from rich.table import Table

from adapterdeck.core.errors import AdapterdeckError

app = typer.Typer(
    help="The demo: offline base, two tenants, training, registry, serving.", no_args_is_help=True
)
out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@app.command("data")
def demo_data(
    out_file: Annotated[Path, typer.Option("--out", help="JSONL file to write.")],
    task: Annotated[str, typer.Option(help="support or sentiment.")] = "support",
    n: Annotated[int, typer.Option(help="Number of examples.")] = 600,
    seed: Annotated[int, typer.Option(help="Seed.")] = 0,
) -> None:
    """Write a demo task as chat JSONL."""
    from adapterdeck.core.demo import TASKS, write_demo_dataset

    if task not in TASKS:
        raise AdapterdeckError(f"unknown demo task {task!r}; tasks: {', '.join(TASKS)}")
    out.print(f"wrote {write_demo_dataset(out_file, task=task, n=n, seed=seed)} ({n} examples)")


@app.command("run")
def demo_run(
    workdir: Annotated[Path, typer.Option(help="Where the demo writes everything.")] = Path("out/demo"),
    base: Annotated[
        str,
        typer.Option(
            help="smollm2-135m-instruct: the real pretrained base (minutes); tiny: random init (fast)."
        ),
    ] = "smollm2-135m-instruct",
    seed: Annotated[int, typer.Option(help="Seed for the base model, the data and the split.")] = 0,
    serve: Annotated[bool, typer.Option(help="Publish, serve and call the adapters after training.")] = True,
    keep_serving: Annotated[
        bool, typer.Option(help="Then keep the gateway and its dashboard (/ui) running until Ctrl-C.")
    ] = False,
) -> None:
    """Build the base, train three tenants' adapters, publish, serve through vLLM, call them, shut down."""
    from adapterdeck.core.basemodel import BASE_NAMES, TINY, build_base_model, ensure_named_base
    from adapterdeck.core.config import parse_config
    from adapterdeck.core.demo import TASKS, demo_config, demo_examples, write_demo_dataset
    from adapterdeck.core.report import RichReporter, print_summary
    from adapterdeck.core.train import run_training

    if base not in BASE_NAMES:
        raise AdapterdeckError(f"--base: expected one of {', '.join(BASE_NAMES)}, got {base!r}")
    started = time.monotonic()
    real = base != TINY
    workdir = workdir.resolve()
    base_dir = workdir / ("base" if not real else base)
    out.rule(f"1. offline base model: {base}")
    with err.status("building the base model") as status:
        if real:
            ensure_named_base(base, base_dir, progress=lambda msg: status.update(msg))
        else:
            build_base_model(base_dir, seed=seed, progress=lambda msg: status.update(msg))
    out.print(f"base model: {base_dir}")
    runs: dict[str, Path] = {}
    reports: dict[str, dict] = {}
    for task, spec in TASKS.items():
        n = demo_examples(task, real)
        if n is None:
            continue
        data = write_demo_dataset(workdir / f"{task}.jsonl", task=task, n=n, seed=seed)
        config = parse_config(
            demo_config(base_dir, data, workdir / "runs" / task, seed, task, real=real), f"demo {task}"
        )
        out.rule(f"2. {spec.tenant}/{task}: training a LoRA adapter ({spec.objective_name})")
        result = run_training(config, RichReporter(out), overwrite=True)
        print_summary(result.report, result.run_dir, out)
        runs[f"{spec.tenant}/{task}"] = result.run_dir
        reports[f"{spec.tenant}/{task}"] = result.report
        del result
    out.rule("training result: held-out test split")
    out.print(_results_table(reports))
    for name, report in reports.items():
        headline = TASKS[name.split("/", 1)[1]].headline
        m = report["test"]["metrics"][headline]
        before, after = m["base"]["value"], m["tuned"]["value"]
        out.print(f"{name}: {headline.replace('_', ' ')} base {before:.0%} -> tuned {after:.0%}")
    if serve:
        served = "tiny-base" if not real else base
        _publish_serve_and_call(workdir, base_dir, runs, served, keep_serving)
    out.print(f"demo finished in {(time.monotonic() - started) / 60:.1f} minutes")


def _results_table(reports: dict[str, dict]) -> Table:
    """Per task: the base prompted zero-shot and few-shot against the tuned adapter, and forgetting."""
    from adapterdeck.core.evaluate import BASE, FEW_SHOT, TUNED

    def pct(m: dict | None, label: str) -> str:
        value = (m or {}).get(label, {}).get("value")
        return "-" if value is None else f"{value:.0%}"

    shots = max((r["test"].get("base_shots", 0) for r in reports.values()), default=0)
    table = Table("task", "metric", "base, system prompt", f"base, {shots}-shot", "tuned", show_lines=False)
    for name, report in reports.items():
        metrics = report["test"]["metrics"]
        for metric in ("exact_match", "json_valid", "first_word", "first_line", "preference_accuracy"):
            if metric in metrics:
                m = metrics[metric]
                table.add_row(name, metric, pct(m, BASE), pct(m, FEW_SHOT), pct(m, TUNED))
        if "general" in metrics:
            g = metrics["general"]
            drop = -(g.get("delta") or 0) * 100
            change = f"forgot {drop:.0f} points" if drop > 0 else "nothing forgotten"
            table.add_row(
                name,
                f"general probes ({g['examples']}): {change}",
                pct(g, BASE),
                "",
                pct(g, TUNED),
            )
    return table


def _wait_ready(proc: subprocess.Popen, url: str, log: Path) -> None:
    with err.status(f"starting vLLM and the gateway (log: {log})"):
        deadline = time.monotonic() + 900
        while True:
            if proc.poll() is not None:
                raise AdapterdeckError(f"the server exited with {proc.returncode}; see {log}")
            try:
                if httpx.get(f"{url}/health", timeout=2).json().get("status") == "ok":
                    return
            except (httpx.HTTPError, ValueError):
                pass
            if time.monotonic() > deadline:
                raise AdapterdeckError(f"the server was not ready in 15 minutes; see {log}")
            time.sleep(1)


def _dashboard(url: str, keys: dict[str, str], keep: subprocess.Popen | None) -> None:
    """Where the dashboard is and the keys to sign in with; with ``keep``, serve until Ctrl-C."""
    out.print(f"dashboard: {url}/ui, sign in with a tenant's key:")
    for tenant, key in keys.items():
        out.print(f"  {tenant}: {key}")
    if keep is not None:
        out.print("serving until Ctrl-C")
        # SIGTERM (a service manager, `kill`) shuts down as cleanly as Ctrl-C.
        signal.signal(signal.SIGTERM, signal.default_int_handler)
        with contextlib.suppress(KeyboardInterrupt):
            keep.wait()


def _ab_test(url: str, key: str, users: int = 40) -> None:
    """An A/B test on live traffic: ``acme/support`` split evenly between its adapter (control)
    and the base (candidate), each answer rated thumbs up when it is the right label, the verdict."""
    import random

    import openai

    from adapterdeck.core.demo import support_record

    out.rule("6. an A/B test: acme/support's adapter against the base, rated by the answers' labels")
    headers = {"Authorization": f"Bearer {key}"}
    body = {"name": "acme/support", "control": "v1", "candidates": [{"ref": "base", "weight": 50}]}
    httpx.post(f"{url}/v1/experiments", json=body, headers=headers, timeout=30).raise_for_status()
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=2)
    rng = random.Random("demo-ab")  # support messages the adapter was not trained on
    for n in range(users):
        messages = support_record(rng)["messages"]
        reply = client.chat.completions.create(
            model="acme/support", messages=messages[:2], user=f"customer-{n}", max_tokens=24, temperature=0
        )
        right = (reply.choices[0].message.content or "").strip() == messages[2]["content"]
        rating = {"response_id": reply.id, "thumbs": "up" if right else "down"}
        httpx.post(f"{url}/v1/feedback", json=rating, headers=headers, timeout=30).raise_for_status()
    report = httpx.get(f"{url}/v1/experiments/acme/support", headers=headers, timeout=30).json()
    for v in report["variants"]:
        share = "-" if v["mean_score"] is None else f"{v['mean_score']:.0%}"
        rated = f"{share} of {v['feedback']} rated up"
        out.print(f"  {v['name']} ({v['ref'] or 'the base model'}): {v['requests']} requests, {rated}")
    out.print(f"verdict: {report['verdict']}")


def _publish_serve_and_call(
    workdir: Path, base: Path, runs: dict[str, Path], served: str, keep_serving: bool = False
) -> None:
    import openai

    from adapterdeck.core.demo import SENTIMENT_SYSTEM, SUPPORT_SYSTEM
    from adapterdeck.registry import Registry, RegistrySettings
    from adapterdeck.registry.tenants import create_key

    home = workdir / "home"
    out.rule("3. registry: publish each tenant's adapter")
    registry = Registry(RegistrySettings(home=home))
    keys = {}
    for adapter, run in runs.items():
        info = registry.publish(run, adapter, alias="prod")
        keys[info.tenant] = create_key(registry, info.tenant)
        out.print(f"published {info.ref} (alias prod), served by {', '.join(info.served_by)}")
    registry.close()

    out.rule("4. serving: gateway + vLLM (CPU build), one base, adapters per request")
    port, vllm_port = _free_port(), _free_port()
    log = workdir / "serve.log"
    env = {**os.environ, "ADAPTERDECK_HOME": str(home)}
    cmd = [
        sys.executable, "-m", "adapterdeck.core.cli", "serve",
        "--base", str(base), "--served-name", served, "--port", str(port),
        "--vllm-port", str(vllm_port), "--max-model-len", "512", "--dtype", "float32",
    ]  # fmt: skip
    with log.open("w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_ready(proc, url, log)
        out.print(f"gateway ready at {url}/v1")

        out.rule("5. calling each tenant's adapter and the base with the openai client")
        prompts = {
            "acme/support": (SUPPORT_SYSTEM, [
                "Hi, this is Tom. The courier lost my tablet (order 1234). No rush at all.",
                "Hi, this is Nora. I was charged twice for the kettle (order 5521). This is urgent.",
            ]),
            "globex/sentiment": (SENTIMENT_SYSTEM, [
                "The blender is excellent and it works great. Bought by Omar in 2024.",
                "The jacket broke in a week but it is lovely. Bought by Sara in 2021.",
            ]),
            "initech/direct": (None, [
                "What is the capital of Italy?", "What is the opposite of \"fast\"?",
            ]),
        }  # fmt: skip
        table = Table("tenant model", "prompt", "base answers", "adapter answers", show_lines=True)
        for adapter, (system, texts) in [(a, p) for a, p in prompts.items() if a in runs]:
            tenant = adapter.split("/")[0]
            client = openai.OpenAI(base_url=f"{url}/v1", api_key=keys[tenant], max_retries=2)
            for text in texts:
                messages = [{"role": "user", "content": text}]
                if system is not None:
                    messages.insert(0, {"role": "system", "content": system})
                answers = {}
                for model in (served, adapter):
                    reply = client.chat.completions.create(
                        model=model, messages=messages, max_tokens=24, temperature=0
                    )
                    answers[model] = f"{reply.choices[0].message.content!s}\n[dim]({reply.model})[/dim]"
                table.add_row(adapter, text, answers[served], answers[adapter])
        out.print(table)
        if "acme/support" in runs:
            _ab_test(url, keys["acme"])
        _dashboard(url, keys, proc if keep_serving else None)
    finally:
        out.rule("7. shutting down")
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        out.print("stopped the gateway and vLLM")
