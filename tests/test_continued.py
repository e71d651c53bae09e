"""Continued tuning (``init_adapter``): a run starts from a published adapter's weights, records
its parent, and is refused with one error when the parent is another tenant's, on another base,
or of another method."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml

from adapterdeck.core.errors import AdapterdeckError
from adapterdeck.registry import Registry, RegistrySettings

from .conftest import run_cli
from .test_registry import tiny_run_config


@pytest.fixture(scope="module")
def support_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from adapterdeck.core.demo import write_demo_dataset

    return write_demo_dataset(tmp_path_factory.mktemp("data") / "support.jsonl", task="support", n=60)


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("continued") / "adapterdeck-home"


def train(config: dict[str, Any], where: Path, home: Path) -> Any:
    run_yaml = where / "run.yaml"
    run_yaml.write_text(yaml.safe_dump(config))
    return run_cli("train", str(run_yaml), env={"ADAPTERDECK_HOME": str(home)})


def config_for(base: Path, data: Path, out: Path, **extra: Any) -> dict[str, Any]:
    config = tiny_run_config(base, data, out)
    config["train"].update({"max_steps": 4, "eval_steps": 2})
    config.update(extra)
    return config


@pytest.fixture(scope="module")
def parent(
    base_model: Path, support_data: Path, home: Path, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    where = tmp_path_factory.mktemp("parent")
    done = train(
        config_for(base_model, support_data, where / "run", publish="acme/support:prod"), where, home
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "published acme/support@1" in done.stdout
    return where / "run"


def test_a_continued_run_starts_where_its_parent_ended_and_records_it(
    parent: Path,
    base_model: Path,
    support_data: Path,
    home: Path,
    tmp_path: Path,
) -> None:
    config = config_for(
        base_model, support_data, tmp_path / "run", publish="acme/support", init_adapter="acme/support:prod"
    )
    done = train(config, tmp_path, home)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "continuing from acme/support@1" in done.stdout  # the alias, resolved once at start
    assert "published acme/support@2" in done.stdout

    theirs = json.loads((parent / "report.json").read_text())
    ours = json.loads((tmp_path / "run" / "report.json").read_text())
    lineage = ours["parent"]
    assert lineage["ref"] == "acme/support@1" and lineage["method"] == "lora"
    assert lineage["data_sha256"] == theirs["data"]["sha256"] and lineage["grandparent"] is None
    # The parent's weights, not a fresh adapter: the run's validation loss before its first step
    # is the parent's best (the checkpoint it kept), on the same validation split.
    assert lineage["start_val_loss"] == pytest.approx(theirs["training"]["best_val_loss"], rel=1e-5)
    fresh_start = theirs["training"]["val_loss"][0]["loss"]
    assert abs(lineage["start_val_loss"] - fresh_start) > 1e-3  # a fresh adapter starts elsewhere
    meta = json.loads((tmp_path / "run" / "adapter" / "adapterdeck.json").read_text())
    assert meta["parent"] == {"ref": "acme/support@1"}
    assert ours["method"]["params"] == theirs["method"]["params"]

    shown = run_cli("registry", "show", "acme/support@2", env={"ADAPTERDECK_HOME": str(home)})
    assert shown.returncode == 0, shown.stderr
    assert "parent           acme/support@1" in shown.stdout
    registry = Registry(RegistrySettings(home=home))
    try:
        assert registry.show("acme/support@2").parent == "acme/support@1"
        assert registry.show("acme/support@1").parent is None
        # A continued adapter cannot be moved to another tenant by publishing it there.
        refused = "tenant 'acme''s adapter; it cannot be published to tenant 'other'"
        with pytest.raises(AdapterdeckError, match=refused):
            registry.publish(tmp_path / "run", "other/copy")
    finally:
        registry.close()

    # A grandchild names both generations.
    again = config_for(base_model, support_data, tmp_path / "again", init_adapter="acme/support@2")
    done = train(again, tmp_path, home)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    lineage = json.loads((tmp_path / "again" / "report.json").read_text())["parent"]
    assert (lineage["ref"], lineage["grandparent"]) == ("acme/support@2", "acme/support@1")


def _other_base(base: Path, where: Path) -> Path:
    other = where / "other-base"
    shutil.copytree(base, other)
    config = json.loads((other / "config.json").read_text())
    config["rms_norm_eps"] = config.get("rms_norm_eps", 1e-6) * 10
    (other / "config.json").write_text(json.dumps(config))
    return other


@pytest.mark.parametrize(
    "case",
    ["another tenant", "another base", "another method", "another rank", "no such version", "not a ref"],
)
def test_a_parent_that_cannot_be_continued_is_one_error_and_trains_nothing(
    case: str,
    parent: Path,
    base_model: Path,
    support_data: Path,
    home: Path,
    tmp_path: Path,
) -> None:
    base, extra, expected = base_model, {"init_adapter": "acme/support@1"}, ""
    if case == "another tenant":
        extra["publish"] = "other/support"
        expected = "acme/support@1 is tenant 'acme''s adapter and this run publishes to tenant 'other'"
    elif case == "another base":
        base = _other_base(base_model, tmp_path)
        expected = "init_adapter: acme/support@1 was trained on base"
    elif case == "another method":
        extra["method"] = {"name": "prefix"}
        expected = "acme/support@1 is a lora adapter and this run trains prefix; set method.name: lora"
    elif case == "another rank":
        extra["method"] = {"name": "lora", "r": 4}
        expected = "keeps its own method parameters; remove or match method.r: 4 (the parent's: 8)"
    elif case == "no such version":
        extra["init_adapter"] = "acme/support@9"
        expected = "no adapter version acme/support@9"
    else:
        extra["init_adapter"] = "just words"
        expected = "is neither an adapter directory nor tenant/name[@N|:alias]"
    done = train(config_for(base, support_data, tmp_path / "run", **extra), tmp_path, home)
    assert done.returncode != 0
    assert expected in done.stdout + done.stderr, done.stdout[-2000:] + done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "run" / "adapter").exists() and not (tmp_path / "run" / "report.json").exists()
