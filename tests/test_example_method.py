"""The example tuning method plugin (examples/adapterdeck-ia3), installed with pip, trains an adapter."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from adapterdeck.core.demo import write_demo_dataset

from .conftest import ROOT, pip_install, run_cli

EXAMPLE = ROOT / "examples" / "adapterdeck-ia3"


@pytest.fixture(scope="module")
def ia3_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The example package, installed with pip (without dependencies) into a directory of its own."""
    return pip_install(EXAMPLE, tmp_path_factory.mktemp("site-ia3"))


def test_ia3_is_listed_from_its_distribution(ia3_site: Path) -> None:
    result = run_cli("plugins", "list", "--json", env={"PYTHONPATH": str(ia3_site)})
    assert result.returncode == 0, result.stderr
    listing = json.loads(result.stdout)
    methods = {p["name"]: p for p in listing["plugins"] if p["kind"] == "method"}
    assert methods["ia3"]["source"] == "adapterdeck-ia3 0.1.0"
    assert methods["ia3"]["served_by"] == ["peft"]
    assert methods["lora"]["source"] == "built-in"
    assert not [e for e in listing["errors"] if e["distribution"] == "adapterdeck-ia3"]


def test_ia3_trains_and_reloads(ia3_site: Path, base_model: Path, tmp_path: Path) -> None:
    data = write_demo_dataset(tmp_path / "sentiment.jsonl", task="sentiment", n=200, seed=0)
    config = {
        "base": str(base_model),
        "data": {"train": str(data)},
        "method": {"name": "ia3"},  # the plugin's defaults, learning rate included
        "train": {"epochs": 3, "batch_size": 16, "eval_steps": 5},
        "eval": {"evaluators": ["loss", "exact_match"], "samples": 2, "max_new_tokens": 8},
        "output": str(tmp_path / "run"),
    }
    run_yaml = tmp_path / "run.yaml"
    run_yaml.write_text(yaml.safe_dump(config), encoding="utf-8")

    result = run_cli("train", str(run_yaml), env={"PYTHONPATH": str(ia3_site)})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["status"] == "succeeded"
    assert report["method"]["name"] == "ia3"
    assert report["method"]["served_by"] == ["peft"]
    assert report["method"]["params"] == {
        "target_modules": ["k_proj", "v_proj", "down_proj"],
        "feedforward_modules": ["down_proj"],
    }
    val_loss = [p["loss"] for p in report["training"]["val_loss"]]
    assert len(val_loss) >= 2
    assert val_loss[-1] < val_loss[0], val_loss
    metrics = report["test"]["metrics"]
    assert metrics["loss"]["tuned"]["value"] < metrics["loss"]["base"]["value"], metrics
    assert "exact_match" in metrics

    adapter = tmp_path / "run" / "adapter"
    adapter_config = json.loads((adapter / "adapter_config.json").read_text())
    assert adapter_config["peft_type"] == "IA3"
    assert json.loads((adapter / "adapterdeck.json").read_text())["served_by"] == ["peft"]

    # The adapter is a plain PEFT adapter: it loads onto the base without the plugin, and generates.
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base_model)
    base = AutoModelForCausalLM.from_pretrained(base_model, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, adapter)
    model.eval()
    prompt = [
        {"role": "system", "content": "Read the review. Answer with one word: positive, negative or mixed."},
        {"role": "user", "content": "The kettle works great and it is lovely. Bought by Maria in 2021."},
    ]
    inputs = tokenizer.apply_chat_template(
        prompt, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        tuned_logits = model(**inputs).logits
        with model.disable_adapter():
            base_logits = model(**inputs).logits
        assert not torch.allclose(tuned_logits, base_logits)
    # Reloaded this way, it answers the run's test samples exactly as the tuned model did in the run.
    assert len(report["samples"]) == config["eval"]["samples"]
    for sample in report["samples"]:
        asked = tokenizer.apply_chat_template(
            sample["prompt"], add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
        with torch.no_grad():
            output = model.generate(
                **asked,
                max_new_tokens=config["eval"]["max_new_tokens"],
                do_sample=False,
                pad_token_id=tokenizer.eos_token_id,
            )
        new_tokens = output[0, asked["input_ids"].shape[1] :]
        assert tokenizer.decode(new_tokens, skip_special_tokens=True).strip() == sample["tuned"], sample
