"""The adapter registry against real parts: SQLite and PostgreSQL, local and S3 storage, real
processes (concurrent publishes, SIGKILL mid-publish), adapters built with PEFT on the offline base.

Every test that takes ``settings`` runs once per database backend.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from sqlalchemy import inspect, text

from adapterdeck.core.basemodel import fingerprint
from adapterdeck.core.errors import AdapterdeckError
from adapterdeck.registry import (
    Conflict,
    InvalidRef,
    NotFound,
    PublishRefused,
    Registry,
    RegistrySettings,
    parse_ref,
)
from adapterdeck.registry import schema as t
from adapterdeck.registry.db import current_revision, head_revision
from adapterdeck.registry.validate import validate

from .conftest import free_port, run_cli
from .registry_helpers import (
    CliForker,
    check_version_complete,
    claim_vllm,
    files_of,
    local_blob_names,
    make_lora,
    postgres_database,
    referenced_blobs,
    sha256_of,
    truncated_copy,
    variant,
)

BACKENDS = ["sqlite", "postgresql"]
CORE_TABLES = {"tenants", "bases", "adapters", "versions", "version_files", "aliases", "alias_events"}


# -- fixtures ---------------------------------------------------------------------------------


@pytest.fixture(params=BACKENDS)
def settings(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[RegistrySettings]:
    """An empty, not yet migrated registry: a SQLite file or a new PostgreSQL database; local blobs."""
    blobs = str(tmp_path / "blobs")
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'registry.db'}"
        yield RegistrySettings(home=tmp_path / "home", database_url=url, storage_url=blobs)
    else:
        with postgres_database() as url:
            yield RegistrySettings(home=tmp_path / "home", database_url=url, storage_url=blobs)


@pytest.fixture
def registry(settings: RegistrySettings) -> Iterator[Registry]:
    reg = Registry(settings)
    yield reg
    reg.close()


@pytest.fixture(scope="module")
def adapters(base_model: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Adapters made with PEFT directly on the demo base (no training), built once per module.

    The ones vLLM cannot serve (``dora``, ``modules_to_save``, ``rank128``, ``bias``,
    ``everything_wrong``) carry the ``adapterdeck.json`` a LoRA training run writes (served by
    vLLM), so vLLM's rules apply to them. The others are bare PEFT output, like ``dora_plain``,
    which the registry accepts as served by PEFT only.
    """
    from adapterdeck.core.basemodel import build_base_model

    root = tmp_path_factory.mktemp("adapters")
    made = {
        "good": make_lora(base_model, root / "good", seed=1),
        "good2": make_lora(base_model, root / "good2", seed=2, r=4, lora_alpha=8),
        "dora_plain": make_lora(base_model, root / "dora_plain", seed=3, use_dora=True),
    }
    made["dora"] = claim_vllm(make_lora(base_model, root / "dora", seed=3, use_dora=True), base_model)
    made["modules_to_save"] = claim_vllm(
        make_lora(base_model, root / "modules_to_save", seed=4, modules_to_save=["lm_head"]), base_model
    )
    made["rank128"] = claim_vllm(
        make_lora(base_model, root / "rank128", seed=5, r=128, lora_alpha=256), base_model
    )
    made["everything_wrong"] = claim_vllm(
        make_lora(
            base_model, root / "everything_wrong", seed=7, r=128, use_dora=True, modules_to_save=["lm_head"]
        ),
        base_model,
    )
    made["bias"] = claim_vllm(make_lora(base_model, root / "bias", seed=8, bias="lora_only"), base_model)
    made["pickle"] = make_lora(base_model, root / "pickle", seed=9, safetensors=False)
    made["truncated"] = truncated_copy(made["good"], root / "truncated")
    other_base = build_base_model(root / "other-base", seed=0, layers=3)
    assert fingerprint(str(other_base)) != fingerprint(str(base_model))
    made["other_base"] = make_lora(other_base, root / "other_base", seed=6)
    return made


@pytest.fixture(scope="module")
def cli_forker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CliForker]:
    forker = CliForker(tmp_path_factory.mktemp("cli-logs"))
    yield forker
    forker.close()


def registry_state(registry: Registry) -> tuple[Any, int, set[str]]:
    storage = Path(registry.settings.resolved_storage_url())
    return registry.list(), registry.count_versions(), local_blob_names(storage)


# -- publish: validation, atomicity, byte-identical pull ----------------------------------------

REFUSALS = [
    ("dora", r"uses DoRA \(use_dora: true\), which vLLM does not serve"),
    ("modules_to_save", r"has modules_to_save \['lm_head'\], which vLLM does not serve"),
    ("rank128", r"rank 128 is above the registry's maximum of 64 \(max_lora_rank\)"),
    ("bias", r"trains biases \(bias: 'lora_only'\), which vLLM does not serve"),
    ("pickle", r"the weights are a pickle \(adapter_model\.bin\); save them as adapter_model\.safetensors"),
    ("truncated", r"adapter_model\.safetensors is truncated: its header needs \d+ bytes of data"),
    ("other_base", r"was trained on another base \(.*other-base, sha256:[0-9a-f]+\); this registry serves"),
]


def test_publish_validates_and_pull_is_byte_identical(
    registry: Registry, adapters: dict[str, Path], base_model: Path, tmp_path: Path
) -> None:
    # validate() checks only: nothing is stored, the base is not recorded.
    candidate = registry.validate(adapters["good"])
    assert candidate.served_by == ["vllm", "peft"] and candidate.rank == 8
    assert registry.bases() == [] and registry_state(registry) == ([], 0, set())

    # The first adapter of an empty registry defines its base.
    info = registry.publish(adapters["good"], "acme/support")
    assert info.ref == "acme/support@1" and info.source == "published"
    assert [b.fingerprint for b in registry.bases()] == [fingerprint(str(base_model))]
    assert info.base_fingerprint == fingerprint(str(base_model))
    assert info.served_by == ["vllm", "peft"] and info.peft_type == "LORA" and info.rank == 8

    out = tmp_path / "pulled"
    assert registry.pull("acme/support@1", out) == out
    source, pulled = files_of(adapters["good"]), files_of(out)
    assert sorted(pulled) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    assert pulled == source  # every file, byte for byte
    check_version_complete(registry, "acme/support", tmp_path / "checked")

    before = registry_state(registry)
    for name, reason in REFUSALS:
        for target in ("acme/support", f"acme/refused-{name.replace('_', '-')}"):
            with pytest.raises(PublishRefused, match=reason) as refused:
                registry.publish(adapters[name], target, alias="prod")
            assert any(re.search(reason, r) for r in refused.value.reasons), refused.value.reasons
            # Nothing of a refused publish is visible: no version, no adapter, no alias, no blob.
            assert registry_state(registry) == before, name
        with pytest.raises(NotFound):
            registry.resolve(f"acme/refused-{name.replace('_', '-')}")
    assert registry.resolve("acme/support").version == 1
    assert registry.show("acme/support@1").aliases == []

    # A refusal lists every reason at once.
    with pytest.raises(PublishRefused) as refused:
        registry.publish(adapters["everything_wrong"], "acme/support")
    for reason in ("uses DoRA", "has modules_to_save", "rank 128 is above"):
        assert any(reason in r for r in refused.value.reasons), refused.value.reasons
    assert f"{len(refused.value.reasons)} problem(s)" in str(refused.value)
    assert registry_state(registry) == before

    # Size limit.
    small = Registry(registry.settings.model_copy(update={"max_adapter_bytes": 10_000}))
    try:
        with pytest.raises(PublishRefused, match=r"the adapter is [\d,]+ bytes; the limit is 10,000"):
            small.publish(adapters["good2"], "acme/support")
    finally:
        small.close()
    assert registry_state(registry) == before

    # A pull is all or nothing: into a non-empty directory it refuses; a corrupt blob leaves nothing.
    with pytest.raises(AdapterdeckError, match="is not empty"):
        registry.pull("acme/support@1", out)
    assert files_of(out) == source
    weights = next(f for f in info.files if f["path"] == "adapter_model.safetensors")
    blob = (
        Path(registry.settings.resolved_storage_url()) / "blobs" / weights["sha256"][:2] / weights["sha256"]
    )
    blob.write_bytes(b"not the weights")
    with pytest.raises(AdapterdeckError, match=f"blob {weights['sha256']} is corrupt"):
        registry.pull("acme/support@1", tmp_path / "corrupt" / "out")
    assert list((tmp_path / "corrupt").iterdir()) == []


def test_base_recorded_by_a_concurrent_publish_is_the_same_base(
    registry: Registry, settings: RegistrySettings, adapters: dict[str, Path]
) -> None:
    """Two first publishes into an empty registry: the other one records the base between this
    one's two reads (``find_base``, then ``known_bases``). Found in the 8-process test; here the
    interleaving is forced, with two real registries on one database."""
    other = Registry(settings)

    def find_base_while_another_publishes(fp: str) -> Any:
        found = registry.find_base(fp)  # None: the registry is still empty
        other.publish(adapters["good2"], "acme/other")  # commits the same base meanwhile
        return found

    try:
        candidate = validate(
            adapters["good"],
            find_base=find_base_while_another_publishes,
            known_bases=registry.bases,
            max_rank=registry.settings.max_lora_rank,
            max_bytes=registry.settings.max_adapter_bytes,
        )
        assert candidate.base.id is not None and candidate.base == registry.bases()[0]
        assert registry.publish(adapters["good"], "acme/support").version == 1
        assert len(registry.bases()) == 1
    finally:
        other.close()


# -- versions, references, aliases, delete ------------------------------------------------------


def test_versions_aliases_and_delete(registry: Registry, adapters: dict[str, Path], tmp_path: Path) -> None:
    good, good2 = adapters["good"], adapters["good2"]
    assert [registry.publish(p, "acme/support").version for p in (good, good2, good)] == [1, 2, 3]
    assert registry.publish(good, "globex/support").version == 1  # numbering is per adapter
    assert registry.publish(good, "acme/other").version == 1

    # tenant/name means prod if set, else the newest version.
    assert registry.resolve("acme/support").version == 3
    with pytest.raises(NotFound, match="acme/support:prod"):
        registry.resolve("acme/support:prod")
    assert registry.set_alias("acme/support", "prod", 2).version == 2
    assert registry.resolve("acme/support").version == 2
    assert registry.resolve("acme/support:prod").version == 2
    assert registry.resolve("acme/support@3").version == 3
    registry.set_alias("acme/support", "staging", 3)
    assert registry.resolve("acme/support:staging").version == 3
    registry.set_alias("acme/support", "prod", 1)
    assert registry.resolve("acme/support").version == 1
    assert registry.show("acme/support@1").aliases == ["prod"]
    assert registry.show("acme/support@2").aliases == []
    assert files_of(registry.pull("acme/support:staging", tmp_path / "staging")) == files_of(good)
    assert files_of(registry.pull("acme/support@2", tmp_path / "two")) == files_of(good2)

    history = registry.alias_history("acme/support")
    assert [(h["alias"], h["from"], h["to"]) for h in history] == [
        ("prod", None, 2),
        ("staging", None, 3),
        ("prod", 2, 1),
    ]
    # Times are UTC with their offset, on every backend (SQLite stores them without one).
    created = datetime.fromisoformat(registry.show("acme/support@1").created_at)
    assert created.utcoffset() == timedelta(0)
    assert abs(datetime.now(UTC) - created) < timedelta(minutes=5)
    moved = [datetime.fromisoformat(h["at"]) for h in history]
    assert all(m.utcoffset() == timedelta(0) for m in moved) and moved == sorted(moved)
    assert moved[0] >= created
    assert registry.alias_history("globex/support") == []
    listed = {row["adapter"]: row for row in registry.list()}
    assert set(listed) == {"acme/other", "acme/support", "globex/support"}
    assert listed["acme/support"]["versions"] == [1, 2, 3]
    assert listed["acme/support"]["aliases"] == {"prod": 1, "staging": 3}
    assert [row["adapter"] for row in registry.list("acme")] == ["acme/other", "acme/support"]

    # A version an alias points at cannot be deleted.
    with pytest.raises(Conflict, match=r"cannot delete acme/support@3: acme/support:staging point"):
        registry.delete("acme/support@3")
    assert registry.resolve("acme/support@3").version == 3
    with pytest.raises(AdapterdeckError, match="exact version"):
        registry.delete("acme/support")
    with pytest.raises(AdapterdeckError, match="exact version"):
        registry.delete("acme/support:staging")

    registry.set_alias("acme/support", "staging", 2)
    registry.delete("acme/support@3")
    with pytest.raises(NotFound, match=r"acme/support@3"):
        registry.resolve("acme/support@3")
    assert registry.list("acme")[1]["versions"] == [1, 2]

    # A deleted version's number is never given again, even though it was the newest.
    info = registry.publish(good2, "acme/support", alias="staging")
    assert (info.version, info.aliases) == (4, ["staging"])
    assert registry.alias_history("acme/support")[-1] | {"at": None} == {
        "alias": "staging",
        "from": 2,
        "to": 4,
        "at": None,
    }
    registry.delete("acme/support@2")
    registry.set_alias("acme/support", "staging", 1)
    registry.delete("acme/support@4")
    assert registry.list("acme")[1]["versions"] == [1]
    assert registry.publish(good, "acme/support").version == 5

    # Deleting every version hides the adapter; its next version still gets a new number.
    registry.delete("acme/other@1")
    assert [row["adapter"] for row in registry.list("acme")] == ["acme/support"]
    with pytest.raises(NotFound):
        registry.resolve("acme/other")
    assert registry.publish(good, "acme/other").version == 2


BAD_REFS = [
    ("Acme/support", r"tenant 'Acme' is not valid: use lowercase letters"),
    ("acme/Support", r"adapter name 'Support' is not valid"),
    ("acme/..", r"adapter name '\.\.' is not valid"),
    ("acme/a..b", r"adapter name 'a\.\.b' is not valid"),
    ("../support", r"tenant '\.\.' is not valid"),
    ("acme/sup/port", r"adapter name 'sup/port' is not valid"),
    ("acme/support.", r"adapter name 'support\.' is not valid"),
    ("acme/_x", r"adapter name '_x' is not valid"),
    ("acme/sup port", r"adapter name 'sup port' is not valid"),
    ("acme", r"'acme': expected tenant/name, tenant/name@N or tenant/name:alias"),
    ("/support", r"tenant is empty"),
    ("acme/", r"adapter name is empty"),
    ("acme/" + "a" * 65, r"is 65 characters long; the limit is 64"),
    ("t" * 41 + "/support", r"is 41 characters long; the limit is 40"),
    ("acme/support:", r"alias is empty"),
    ("acme/support:Prod", r"alias 'Prod' is not valid: use lowercase letters, digits, '-' and '_'"),
    ("acme/support:1st", r"alias '1st' is not valid"),
    ("acme/support:" + "a" * 33, r"is 33 characters long; the limit is 32"),
    ("acme/support@0", r"the version after '@' must be a positive integer"),
    ("acme/support@-1", r"must be a positive integer"),
    ("acme/support@", r"must be a positive integer"),
    ("acme/support@v2", r"must be a positive integer"),
    ("acme/support@1:prod", r"must be a positive integer"),
    ("acme/support@²", r"must be a positive integer"),  # a digit to str.isdigit, not to int()
    ("acme/support@١", r"must be a positive integer"),  # Arabic-Indic one
    ("acme/support\n", r"is not valid"),  # '$' would match before a final newline
    ("acme\n/support", r"tenant 'acme\\n' is not valid"),
    ("acme/support:prod\n", r"alias 'prod\\n' is not valid"),
]


def test_a_version_keeps_its_run_report_and_lists_with_its_aliases(
    registry: Registry, adapters: dict[str, Path], tmp_path: Path
) -> None:
    run = tmp_path / "run"
    shutil.copytree(adapters["good"], run / "adapter")
    report = {
        "status": "succeeded",
        "training": {"train_loss": [{"step": 1, "loss": 2.5}]},
        "test": {"metrics": {"exact_match": {"tuned": {"value": 0.5}}}},
        "note": "<b>kept</b>",
    }
    (run / "report.json").write_text(json.dumps(report))
    assert registry.publish(adapters["good"], "acme/reported").version == 1  # a bare adapter: no report
    assert registry.publish(run, "acme/reported", alias="prod").version == 2
    assert registry.report("acme/reported@1") is None
    assert registry.report("acme/reported:prod") == report  # the whole report, as published
    assert registry.show("acme/reported@2").metrics == report["test"]["metrics"]
    listed = registry.versions("acme/reported")
    assert [(v.version, v.aliases) for v in listed] == [(1, []), (2, ["prod"])]
    assert listed[0].report_sha256 is None and listed[1].report_sha256
    # gc keeps a referenced report's blob; it goes only with its version.
    registry.gc(grace_seconds=0)
    assert registry.report("acme/reported@2") == report
    with pytest.raises(NotFound):
        registry.versions("acme/no-such")


@pytest.mark.parametrize(("ref", "message"), BAD_REFS, ids=[repr(r)[1:-1][:24] for r, _ in BAD_REFS])
def test_bad_references_are_explained(ref: str, message: str) -> None:
    with pytest.raises(InvalidRef, match=message):
        parse_ref(ref)


def test_good_references_parse() -> None:
    assert parse_ref("acme/support") == parse_ref("acme/support")
    ref = parse_ref("acme-1/sup_port.v2@12")
    assert (ref.tenant, ref.name, ref.version, ref.alias) == ("acme-1", "sup_port.v2", 12, None)
    assert str(ref) == "acme-1/sup_port.v2@12" and ref.immutable
    ref = parse_ref("acme/support:canary-2")
    assert (ref.version, ref.alias, ref.immutable) == (None, "canary-2", False)
    assert parse_ref("a" * 40 + "/" + "b" * 64).name == "b" * 64


def test_bad_names_store_nothing(registry: Registry, adapters: dict[str, Path]) -> None:
    for adapter, alias, message in [
        ("Acme/support", None, "tenant 'Acme' is not valid"),
        ("acme/sup/port", None, "adapter name 'sup/port' is not valid"),
        ("acme/support@2", None, "expected tenant/name without a version or alias"),
        ("acme/support:prod", None, "expected tenant/name without a version or alias"),
        ("acme/support", "Prod", "alias 'Prod' is not valid"),
        ("acme/support", "", "alias is empty"),
    ]:
        with pytest.raises(InvalidRef, match=message):
            registry.publish(adapters["good"], adapter, alias=alias)
    assert registry_state(registry) == ([], 0, set())
    registry.publish(adapters["good"], "acme/support")
    for alias in ("", "Prod", "../x"):
        with pytest.raises(InvalidRef, match="alias"):
            registry.set_alias("acme/support", alias, 1)
    with pytest.raises(InvalidRef, match="positive integer"):
        registry.delete("acme/support@0")
    assert registry.alias_history("acme/support") == []


def test_unknown_references_are_not_found(
    registry: Registry, adapters: dict[str, Path], tmp_path: Path
) -> None:
    with pytest.raises(NotFound, match="no adapter version acme/support"):
        registry.resolve("acme/support")
    registry.publish(adapters["good"], "acme/support")
    for ref in ("nobody/support", "acme/nothing", "acme/support@2", "acme/support:prod", "nobody/x:prod"):
        with pytest.raises(NotFound, match=re.escape(ref)):
            registry.resolve(ref)
        with pytest.raises(NotFound):
            registry.show(ref)
        with pytest.raises(NotFound):
            registry.pull(ref, tmp_path / "out")
        assert not (tmp_path / "out").exists()
    with pytest.raises(NotFound, match="acme/support@7"):
        registry.delete("acme/support@7")
    with pytest.raises(NotFound, match="acme/support@9"):
        registry.set_alias("acme/support", "prod", 9)
    with pytest.raises(NotFound):
        registry.set_alias("acme/nothing", "prod", 1)
    with pytest.raises(NotFound, match="no adapter acme/nothing"):
        registry.alias_history("acme/nothing")
    assert registry.list("nobody") == []
    assert registry.count_versions() == 1


# -- import of plain PEFT adapters through the CLI ----------------------------------------------


def test_cli_import_of_plain_peft(
    settings: RegistrySettings, adapters: dict[str, Path], base_model: Path, tmp_path: Path
) -> None:
    home = tmp_path / "cli-home"
    cli = ["registry", "--home", str(home), "--db", settings.resolved_database_url()]
    assert not (adapters["good"] / "adapterdeck.json").exists()

    done = run_cli(*cli, "import", str(adapters["good"]), "acme/imported")
    assert done.returncode == 0, done.stderr
    assert "imported acme/imported@1, served by vllm, peft" in done.stdout

    shown = run_cli(*cli, "show", "acme/imported", "--json")
    assert shown.returncode == 0, shown.stderr
    payload = json.loads(shown.stdout)
    assert payload["ref"] == "acme/imported@1"
    assert payload["source"] == "imported"
    assert payload["served_by"] == ["vllm", "peft"]
    assert payload["base_fingerprint"] == fingerprint(str(base_model))
    assert payload["base"] == str(base_model)
    assert payload["rank"] == 8 and payload["peft_type"] == "LORA" and payload["method"] == "peft:lora"
    assert payload["params"]["r"] == 8 and payload["params"]["lora_alpha"] == 16
    local = sorted(p for p in adapters["good"].iterdir() if p.is_file())
    assert payload["files"] == [
        {"path": p.name, "sha256": sha256_of(p), "size": p.stat().st_size} for p in local
    ]
    assert payload["size_bytes"] == sum(p.stat().st_size for p in local)
    assert payload["aliases"] == [] and payload["alias_history"] == []
    assert payload["metrics"] is None and payload["dataset_sha256"] is None

    # The CLI kept the blobs under --home; the Python API sees the same registry.
    registry = Registry(RegistrySettings(home=home, database_url=settings.resolved_database_url()))
    try:
        assert (home / "blobs").is_dir()
        assert files_of(registry.pull("acme/imported@1", tmp_path / "pulled")) == files_of(adapters["good"])
        # A plain PEFT adapter vLLM cannot serve (DoRA) imports as served by PEFT only.
        dora = registry.import_adapter(adapters["dora_plain"], "acme/dora", alias="prod")
        assert (dora.served_by, dora.source, dora.aliases) == (["peft"], "imported", ["prod"])
        # The same adapter claiming vLLM is refused instead.
        with pytest.raises(PublishRefused, match="uses DoRA"):
            registry.import_adapter(adapters["dora"], "acme/dora")
        assert {row["adapter"]: row["versions"] for row in registry.list()} == {
            "acme/dora": [1],
            "acme/imported": [1],
        }
    finally:
        registry.close()


# -- real processes: concurrent publishes, SIGKILL mid-publish ---------------------------------


def publish_argv(settings: RegistrySettings, adapter: Path, name: str) -> list[str]:
    """``adapterdeck registry --db URL --storage DIR publish ADAPTER NAME``, without the program name."""
    db, storage = settings.resolved_database_url(), settings.resolved_storage_url()
    return ["registry", "--db", db, "--storage", storage, "publish", str(adapter), name]


def test_concurrent_publishes_from_separate_processes(
    settings: RegistrySettings, adapters: dict[str, Path], cli_forker: CliForker, tmp_path: Path
) -> None:
    # The database is new and not migrated: the 8 processes also race to create the schema.
    pids = cli_forker.start(publish_argv(settings, adapters["good"], "acme/conc"), n=8)
    assert len(set(pids)) == 8
    results = [cli_forker.wait(pid) for pid in pids]
    for r in results:
        assert r["status"] == 0, r["output"]
    numbers = sorted(int(re.search(r"published acme/conc@(\d+)", r["output"])[1]) for r in results)
    assert numbers == list(range(1, 9))

    registry = Registry(settings)
    try:
        [row] = registry.list()
        assert (row["adapter"], row["versions"], row["latest"]) == ("acme/conc", list(range(1, 9)), 8)
        assert current_revision(registry.engine) == head_revision()
        for n in range(1, 9):
            check_version_complete(registry, f"acme/conc@{n}", tmp_path / f"v{n}")
            assert files_of(tmp_path / f"v{n}") == files_of(adapters["good"])
        # One content, stored once: 3 files and 1 manifest, no temporary files left.
        blobs = local_blob_names(Path(settings.resolved_storage_url()))
        assert blobs == referenced_blobs(registry) and len(blobs) == 4
    finally:
        registry.close()


def test_concurrent_alias_moves_from_separate_processes(
    registry: Registry, settings: RegistrySettings, adapters: dict[str, Path], cli_forker: CliForker
) -> None:
    for _ in range(2):
        registry.publish(adapters["good"], "acme/alias")
    db, storage = settings.resolved_database_url(), settings.resolved_storage_url()
    for alias in ("canary", "prod"):  # a new alias (created concurrently), then moves of it
        cli = ["registry", "--db", db, "--storage", storage, "alias", "acme/alias", alias]
        for pid in cli_forker.start_each([[*cli, str(1 + i % 2)] for i in range(8)]):
            result = cli_forker.wait(pid)
            assert result["status"] == 0, result["output"]
    history = registry.alias_history("acme/alias")
    for alias in ("canary", "prod"):
        moves = [(h["from"], h["to"]) for h in history if h["alias"] == alias]
        assert len(moves) == 8
        # Every move is recorded from where the alias really was: one unbroken chain.
        assert moves[0][0] is None
        assert all(moves[i][0] == moves[i - 1][1] for i in range(1, 8)), moves
        assert registry.resolve(f"acme/alias:{alias}").version == moves[-1][1]


def test_sigkill_mid_publish_never_shows_half_a_version(
    settings: RegistrySettings, adapters: dict[str, Path], cli_forker: CliForker, tmp_path: Path
) -> None:
    storage = Path(settings.resolved_storage_url())
    registry = Registry(settings)
    pulls = iter(range(10_000))

    def check_all_visible() -> list[int]:
        rows = registry.list()
        versions = rows[0]["versions"] if rows else []
        assert versions == list(range(1, len(versions) + 1))  # no gaps: a killed publish took no number
        for n in versions:
            check_version_complete(registry, f"acme/kill@{n}", tmp_path / "pulls" / str(next(pulls)))
        return versions

    try:
        assert registry.publish(adapters["good"], "acme/kill").version == 1
        # How long one whole publish takes in a process (what the kills are spread over).
        measured = cli_forker.run(
            publish_argv(settings, variant(adapters["good"], tmp_path / "v0", 0), "acme/kill")
        )
        assert measured["status"] == 0, measured["output"]
        assert "published acme/kill@2" in measured["output"]
        span = measured["elapsed"]

        rng = random.Random(1234)
        rounds = 8
        # Stratified over [0, span): early, middle and late kills all happen.
        delays: list[float | None] = [span * (i + rng.random()) / rounds for i in range(rounds)]
        rng.shuffle(delays)
        delays += [None, None]  # None: kill the moment the process's first blob lands in the store
        killed = orphaned = 0
        visible = check_all_visible()
        for i, delay in enumerate(delays, start=1):
            adapter = variant(adapters["good"], tmp_path / f"v{i}", i)
            before = local_blob_names(storage)
            [pid] = cli_forker.start(publish_argv(settings, adapter, "acme/kill"))
            if delay is None:
                deadline = time.monotonic() + 10 * span + 10
                while local_blob_names(storage) <= before and time.monotonic() < deadline:
                    time.sleep(0.001)
            else:
                time.sleep(delay)
            os.kill(pid, signal.SIGKILL)  # not reaped yet: the pid is still this child's
            result = cli_forker.wait(pid)
            assert result["status"] in (0, -signal.SIGKILL), result["output"]
            killed += result["status"] == -signal.SIGKILL

            now = check_all_visible()
            assert len(now) - len(visible) in (0, 1), (visible, now)
            if result["status"] == 0:
                assert len(now) == len(visible) + 1
            if len(now) == len(visible) and local_blob_names(storage) - before:
                orphaned += 1  # killed after uploading some blobs, before the commit
            visible = now
        assert killed >= 1, f"no publish was killed (span {span:.2f}s)"

        # The registry still works: the next publish takes the next number.
        info = registry.publish(variant(adapters["good"], tmp_path / "after", 99), "acme/kill")
        assert info.version == len(visible) + 1
        visible = check_all_visible()

        needed = referenced_blobs(registry)
        stored = local_blob_names(storage)
        assert needed <= stored
        orphans = stored - needed
        assert bool(orphans) == (orphaned > 0), (orphans, orphaned)
        # Young orphans are kept (a publish may be in flight), with no grace they go.
        assert registry.gc()["removed"] == 0 and local_blob_names(storage) == stored
        result = registry.gc(grace_seconds=0)
        assert result["removed"] == len(orphans)
        if orphaned:
            assert result["removed"] > 0
        assert local_blob_names(storage) == needed
        assert check_all_visible() == visible
    finally:
        registry.close()


# -- S3 storage ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    """A real S3 server on loopback: moto's server implements the S3 HTTP API (objects kept in
    memory); s3fs and boto3 talk to it over HTTP as they would to AWS. Nothing is patched."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


def test_s3_storage(
    settings: RegistrySettings,
    adapters: dict[str, Path],
    s3_endpoint: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import boto3

    for key, value in {
        "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "test",
        "AWS_DEFAULT_REGION": "us-east-1",
    }.items():
        monkeypatch.setenv(key, value)
    bucket = f"adapters-{uuid.uuid4().hex[:12]}"
    s3 = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    s3.create_bucket(Bucket=bucket)

    def keys() -> set[str]:
        pages = s3.get_paginator("list_objects_v2").paginate(Bucket=bucket)
        return {o["Key"] for page in pages for o in page.get("Contents", [])}

    def key_of(sha: str) -> str:
        return f"prefix/blobs/{sha[:2]}/{sha}"

    s3_settings = settings.model_copy(
        update={
            "storage_url": f"s3://{bucket}/prefix",
            "storage_options": {"endpoint_url": s3_endpoint, "key": "test", "secret": "test"},
        }
    )
    registry = Registry(s3_settings)
    try:
        first = registry.publish(adapters["good"], "acme/s3")
        stored = keys()
        assert stored == {key_of(first.manifest_sha256), *(key_of(f["sha256"]) for f in first.files)}
        weights = next(f for f in first.files if f["path"] == "adapter_model.safetensors")
        body = s3.get_object(Bucket=bucket, Key=key_of(weights["sha256"]))["Body"].read()
        assert body == (adapters["good"] / "adapter_model.safetensors").read_bytes()
        check_version_complete(registry, "acme/s3@1", tmp_path / "one")
        assert files_of(tmp_path / "one") == files_of(adapters["good"])

        # The same adapter again: a new version, not one new object.
        second = registry.publish(adapters["good"], "acme/s3")
        assert second.version == 2 and second.manifest_sha256 == first.manifest_sha256
        assert keys() == stored

        third = registry.publish(adapters["good2"], "acme/s3")
        with_third = keys()
        assert with_third > stored
        registry.delete("acme/s3@3")
        assert registry.gc()["removed"] == 0  # within the grace period
        result = registry.gc(grace_seconds=0)
        assert result["removed"] == len(with_third - stored) > 0
        assert keys() == stored
        with pytest.raises(NotFound):
            registry.resolve(third.ref)
        for n in (1, 2):
            check_version_complete(registry, f"acme/s3@{n}", tmp_path / f"again{n}")
            assert files_of(tmp_path / f"again{n}") == files_of(adapters["good"])
    finally:
        registry.close()

    # Another registry on the same database and bucket sees the same versions.
    again = Registry(s3_settings)
    try:
        assert again.list()[0]["versions"] == [1, 2]
        assert files_of(again.pull("acme/s3", tmp_path / "fresh")) == files_of(adapters["good"])
    finally:
        again.close()


# -- migrations -----------------------------------------------------------------------------------


def test_migrations_are_idempotent_and_at_head(settings: RegistrySettings, adapters: dict[str, Path]) -> None:
    first = Registry(settings)
    try:
        assert current_revision(first.engine) == head_revision()
        first.publish(adapters["good"], "acme/support", alias="prod")
    finally:
        first.close()

    second = Registry(settings)  # opening again migrates nothing and loses nothing
    try:
        with second.engine.connect() as conn:
            assert conn.execute(text("SELECT version_num FROM alembic_version")).scalars().all() == [
                head_revision()
            ]
        found = inspect(second.engine)
        tables = set(found.get_table_names())
        assert CORE_TABLES | {"alembic_version"} <= tables
        # The migrations build exactly the tables and columns the code uses.
        for name, table in t.metadata.tables.items():
            assert name in tables, name
            assert {c["name"] for c in found.get_columns(name)} == set(table.columns.keys()), name
        assert second.resolve("acme/support:prod").version == 1
    finally:
        second.close()
    third = Registry(settings)
    try:
        assert current_revision(third.engine) == head_revision()
        assert third.count_versions() == 1
    finally:
        third.close()


# -- publish: in a run config -----------------------------------------------------------------


def tiny_run_config(base: Path, data: Path, output: Path) -> dict[str, Any]:
    from adapterdeck.core.demo import demo_config

    config = demo_config(base, data, output)
    config["train"].update({"max_steps": 2, "batch_size": 4, "eval_steps": 1, "logging_steps": 1})
    config["eval"] = {"evaluators": ["loss"], "samples": 0}
    return config


@pytest.fixture(scope="module")
def support_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from adapterdeck.core.demo import write_demo_dataset

    return write_demo_dataset(tmp_path_factory.mktemp("data") / "support.jsonl", task="support", n=60)


@pytest.fixture(scope="module")
def trained_run(base_model: Path, support_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from adapterdeck.core.config import parse_config
    from adapterdeck.core.train import run_training

    out = tmp_path_factory.mktemp("train") / "run"
    result = run_training(parse_config(tiny_run_config(base_model, support_data, out)))
    assert result.report["status"] == "succeeded"
    return result.run_dir


def test_publish_run_of_a_training_run(
    settings: RegistrySettings, trained_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from adapterdeck.core.plugins import publish_run

    home = tmp_path / "adapterdeck-home"
    for name in ("DATABASE_URL", "STORAGE_URL", "STORAGE_OPTIONS", "MAX_LORA_RANK", "MAX_ADAPTER_BYTES"):
        monkeypatch.delenv(f"ADAPTERDECK_{name}", raising=False)
    monkeypatch.setenv("ADAPTERDECK_HOME", str(home))
    if settings.resolved_database_url().startswith("postgresql"):
        monkeypatch.setenv("ADAPTERDECK_DATABASE_URL", settings.resolved_database_url())

    assert publish_run(trained_run, "acme/support", "prod") == "acme/support@1"

    report = json.loads((trained_run / "report.json").read_text())
    registry = Registry()  # the same settings, from the environment
    try:
        info = registry.show("acme/support")
        assert info.ref == "acme/support@1" and info.aliases == ["prod"]
        assert info.metrics == report["test"]["metrics"] and set(info.metrics) == {"loss"}
        assert info.dataset_sha256 == report["data"]["sha256"]
        assert info.data_format == report["data"]["format"] == "chat"
        assert info.base_fingerprint == report["base"]["fingerprint"]
        assert info.library_versions == report["versions"]
        assert (info.method, info.served_by, info.source) == ("lora", ["vllm", "peft"], "published")
        assert registry.resolve("acme/support:prod").version == 1
        assert [(h["alias"], h["from"], h["to"]) for h in registry.alias_history("acme/support")] == [
            ("prod", None, 1)
        ]
        assert files_of(registry.pull("acme/support:prod", tmp_path / "pulled")) == files_of(
            trained_run / "adapter"
        )
    finally:
        registry.close()
    if not settings.resolved_database_url().startswith("postgresql"):
        assert (home / "registry.db").is_file() and (home / "blobs").is_dir()


def test_cli_train_with_publish_in_the_run_config(
    base_model: Path, support_data: Path, tmp_path: Path
) -> None:
    config = tiny_run_config(base_model, support_data, tmp_path / "run")
    config["publish"] = "acme/support:prod"
    run_yaml = tmp_path / "run.yaml"
    run_yaml.write_text(yaml.safe_dump(config))
    home = tmp_path / "adapterdeck-home"

    done = run_cli("train", str(run_yaml), env={"ADAPTERDECK_HOME": str(home)})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "published acme/support@1" in done.stdout

    registry = Registry(RegistrySettings(home=home))
    try:
        info = registry.show("acme/support:prod")
        assert info.version == 1 and info.aliases == ["prod"] and set(info.metrics) == {"loss"}
        report = json.loads((tmp_path / "run" / "report.json").read_text())
        assert info.metrics == report["test"]["metrics"]
    finally:
        registry.close()
