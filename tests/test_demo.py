"""The demo: reproducible data for three tenants, and the README's main command reaching the bar."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from adapterdeck.core.config import load_config

from .conftest import ROOT, run_cli

DEMO = ROOT / "examples" / "demo"


def test_demo_files_are_generated_deterministically(tmp_path: Path) -> None:
    subprocess.run([sys.executable, str(DEMO / "make_demo.py"), "--out", str(tmp_path)], check=True)
    for task in ("support", "sentiment", "direct"):
        for name in (f"{task}.jsonl", f"{task}.yaml"):
            assert (tmp_path / name).read_bytes() == (DEMO / name).read_bytes(), name
        config = load_config(DEMO / f"{task}.yaml")
        assert config.data.train == [DEMO / f"{task}.jsonl"]
        assert config.method.name == "lora"
        assert config.objective.name == ("dpo" if task == "direct" else "sft")


@pytest.mark.vllm
@pytest.mark.timeout(1800)  # about 3 minutes alone; much more on a machine shared with other jobs
def test_demo_run_is_the_whole_product_and_reaches_the_bar(tmp_path: Path) -> None:
    result = run_cli(
        "demo", "run", "--base", "tiny", "--workdir", str(tmp_path), env={"COLUMNS": "200"}, timeout=1500
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for task in ("support", "sentiment"):
        report = json.loads((tmp_path / "runs" / task / "report.json").read_text())
        exact = report["test"]["metrics"]["exact_match"]
        assert exact["base"]["value"] <= 0.05, (task, exact)
        assert exact["tuned"]["value"] >= 0.6, (task, exact)
        assert (tmp_path / "runs" / task / "loss.png").exists()
    assert "acme/support: exact match base 0% -> tuned" in result.stdout
    # The preference task: DPO raises the share of held-out pairs whose preferred side is likelier.
    metrics = json.loads((tmp_path / "runs" / "direct" / "report.json").read_text())["test"]["metrics"]
    accuracy = metrics["preference_accuracy"]
    assert accuracy["tuned"]["value"] >= 0.6 and accuracy["tuned"]["value"] > accuracy["base"]["value"], (
        accuracy
    )  # measured 0.8 from 0
    assert metrics["first_word"]["tuned"]["value"] >= 0.8, metrics["first_word"]  # "TL;DR" first: 1.0
    assert "initech/direct: preference accuracy base" in result.stdout
    # Published, served through vLLM, called with the openai client, shown side by side, stopped.
    for expected in (
        "published acme/support@1",
        "published globex/sentiment@1",
        "published initech/direct@1",
        "gateway ready",
    ):
        assert expected in result.stdout
    assert "(acme/support@1)" in result.stdout and "(globex/sentiment@1)" in result.stdout
    assert "(initech/direct@1)" in result.stdout
    assert '{"category": ' in result.stdout
    # An A/B test on live traffic, acme/support's adapter against the base, rated and decided.
    assert "v1 (acme/support@1): " in result.stdout and "base (the base model): " in result.stdout
    assert "verdict: base worse than v1, p" in result.stdout, result.stdout[-2000:]
    assert "stopped the gateway and vLLM" in result.stdout
    assert subprocess.run(["pgrep", "-f", str(tmp_path)], capture_output=True).returncode == 1
