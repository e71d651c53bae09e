"""Hostile input against the data and registry layers, through every door: the Python API, the
CLI, the gateway's HTTP API and vLLM's resolver. Names and references that try to climb out of a
directory or pass for another name, adapter directories with files that are not what they claim,
safetensors headers and adapter configs that lie, JSONL files that are not what a JSONL file
should be.

Real files, a real SQLite registry, the real CLI (``run_cli``), a real ``adapterdeck serve``
(started without vLLM: these endpoints answer before any engine is needed) and the real resolver
class. Every case asserts what the user sees (the exception and its reason, the exit status and
the one-line message, the status code and the JSON error) and what must not happen (a version, a
blob, a file outside the registry home).
"""

from __future__ import annotations

import http.client
import json
import os
import random
import shutil
import struct
import tracemalloc
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import update

from adapterdeck.core.dataset import DataError, load_examples, validate_file
from adapterdeck.core.errors import AdapterdeckError
from adapterdeck.registry import InvalidRef, PublishRefused, Registry, RegistrySettings, parse_ref
from adapterdeck.registry import schema as t
from adapterdeck.registry.refs import Ref
from adapterdeck.registry.tenants import create_key
from adapterdeck.registry.untrusted import read_safetensors_header
from adapterdeck.serve.engines.resolver import AdapterdeckResolver

from .conftest import free_port, run_cli
from .gateway_helpers import start_gateway
from .registry_helpers import local_blob_names, make_lora

WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"
META = "adapterdeck.json"


# -- fixtures ---------------------------------------------------------------------------------


@dataclass
class Home:
    """One registry home for the module: ``acme/support@1`` published, plus what a test needs."""

    root: Path
    registry: Registry
    lora: Path  # a sound PEFT LoRA adapter made on the demo base

    @property
    def env(self) -> dict[str, str]:
        return {"ADAPTERDECK_HOME": str(self.root)}

    def state(self) -> tuple[Any, int, set[str]]:
        """Everything a refused operation must leave as it was: adapters, versions, blobs."""
        storage = Path(self.registry.settings.resolved_storage_url())
        return self.registry.list(), self.registry.count_versions(), local_blob_names(storage)


@pytest.fixture(scope="module")
def home(base_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Home]:
    root = tmp_path_factory.mktemp("hostile") / "home"
    registry = Registry(RegistrySettings(home=root))
    lora = make_lora(base_model, tmp_path_factory.mktemp("lora") / "lora", seed=1)
    registry.publish(lora, "acme/support")
    yield Home(root, registry, lora)
    registry.close()


def files_outside(root: Path, allowed: list[Path]) -> list[Path]:
    """Files under ``root`` that are in none of the ``allowed`` directories."""
    return [p for p in root.rglob("*") if p.is_file() and not any(p.is_relative_to(a) for a in allowed)]


# -- names and references ---------------------------------------------------------------------

# (reference, what the message must say)
NAMES: list[tuple[str, str]] = [
    ("../support", "tenant '..' is not valid"),
    ("acme/..", "adapter name '..' is not valid"),
    ("acme/../support", "adapter name '../support' is not valid"),
    ("acme/sup/port", "'/' SOLIDUS at position 4 is not allowed"),
    ("acme//support", "adapter name '/support' is not valid"),
    ("/etc/passwd", "tenant is empty"),
    ("acme/a..b", "'..' at position 2 is not allowed"),
    ("acme\\support/x", "'\\\\' REVERSE SOLIDUS at position 5"),
    ("acme/sup\\port", "REVERSE SOLIDUS at position 4"),
    ("acme/C:\\x", "alias '\\\\x' is not valid"),
    ("acme/sup\x00port", "'\\x00' at position 4 is not allowed"),
    ("acme/sup\x1b[2Jport", "'\\x1b' at position 4 is not allowed"),
    ("acme/support\n", "'\\n' at position 8"),
    ("acme\r/support", "'\\r' at position 5"),
    ("acme/sup\tport", "'\\t' at position 4"),
    (" acme/support", "' ' SPACE at position 1"),
    ("acme/support ", "' ' SPACE at position 8"),
    ("acme/sup\u00a0port", "U+00A0 NO-BREAK SPACE at position 4"),
    ("acme/" + "a" * 65, "is 65 characters long; the limit is 64"),
    ("t" * 41 + "/support", "is 41 characters long; the limit is 40"),
    ("acme/" + "a" * 100_000, "is 100000 characters long; the limit is 64"),
    ("\u0430cme/support", "U+0430 CYRILLIC SMALL LETTER A at position 1"),
    ("acme/\uff53upport", "U+FF53 FULLWIDTH LATIN SMALL LETTER S at position 1"),
    ("acme/l\u0131nk", "U+0131 LATIN SMALL LETTER DOTLESS I at position 2"),
    ("acme/support\u0301", "U+0301 COMBINING ACUTE ACCENT at position 8"),
    ("acme/\u202etroppus", "U+202E RIGHT-TO-LEFT OVERRIDE at position 1"),
    ("acme/support\u200f", "U+200F RIGHT-TO-LEFT MARK at position 8"),
    ("acme/sup\u200bport", "U+200B ZERO WIDTH SPACE at position 4"),
    ("acme/%2e%2e", "'%' PERCENT SIGN at position 1"),
    ("acme/support%2F..", "'%' PERCENT SIGN at position 8"),
    ("acme%2Fsupport", "expected tenant/name"),
    ("acme/support:../prod", "alias '../prod' is not valid"),
    ("acme/support:pr\u043ed", "U+043E CYRILLIC SMALL LETTER O at position 3"),
    ("acme/support@1/../2", "the version after '@' must be a positive integer"),
    ("acme/support@01", "the version after '@' must be a positive integer"),
    ("acme/support@\uff11", "the version after '@' must be a positive integer"),
    ("acme/support@2147483648", "must be a positive integer up to 2147483647"),
    ("acme/support@" + "9" * 5000, "must be a positive integer up to 2147483647"),
]
NAME_IDS = [repr(name)[1:-1][:28] for name, _ in NAMES]
# What a shell can pass as an argument (no NUL), a few of each kind.
CLI_NAMES = [
    (name, message)
    for name, message in NAMES
    if "\x00" not in name
    and name
    in {
        "../support",
        "acme/../support",
        "acme/sup\\port",
        "acme/sup\x1b[2Jport",
        "acme/support\n",
        "acme/" + "a" * 100_000,
        "\u0430cme/support",
        "acme/\uff53upport",
        "acme/support\u0301",
        "acme/\u202etroppus",
        "acme/%2e%2e",
        "acme/support@" + "9" * 5000,
    }
]


@pytest.mark.parametrize(("name", "message"), NAMES, ids=NAME_IDS)
def test_parse_ref_names_what_is_wrong(name: str, message: str) -> None:
    with pytest.raises(InvalidRef) as refused:
        parse_ref(name)
    text = str(refused.value)
    assert message in text
    assert "\n" not in text and len(text) < 300  # one line, however long or strange the input


@pytest.mark.parametrize(("name", "message"), NAMES, ids=NAME_IDS)
def test_the_registry_refuses_the_name_everywhere(home: Home, name: str, message: str) -> None:
    before = home.state()
    reg = home.registry
    with pytest.raises(InvalidRef):
        reg.publish(home.lora, name)
    with pytest.raises(InvalidRef):
        reg.publish(home.lora, "acme/support", alias=name)
    for call in (reg.resolve, reg.show, reg.delete, reg.alias_history):
        with pytest.raises(InvalidRef):
            call(name)
    out = home.root.parent / f"pull-{uuid.uuid4().hex}"
    with pytest.raises(InvalidRef):
        reg.pull(name, out)
    assert not out.exists()
    with pytest.raises(InvalidRef):
        reg.set_alias(name, "prod", 1)
    assert home.state() == before


def test_a_ref_built_in_code_obeys_the_same_rules(home: Home) -> None:
    for parts in [("..", "x"), ("acme", "../x"), ("acme", "x\x00"), ("\u0430cme", "x")]:
        with pytest.raises(InvalidRef):
            Ref(*parts)
    for version in (0, -1, 2**31, 2**70, True, "1"):
        with pytest.raises(InvalidRef, match="positive integer"):
            Ref("acme", "support", version=version)  # type: ignore[arg-type]
        with pytest.raises(InvalidRef):
            home.registry.set_alias("acme/support", "prod", version)  # type: ignore[arg-type]
    with pytest.raises(InvalidRef, match="not both"):
        Ref("acme", "support", version=1, alias="prod")
    assert home.registry.resolve(Ref("acme", "support", version=1)).ref == "acme/support@1"


@pytest.mark.parametrize(("name", "message"), CLI_NAMES, ids=[repr(n)[1:-1][:28] for n, _ in CLI_NAMES])
def test_cli_refuses_the_name_with_one_line(home: Home, name: str, message: str) -> None:
    before = home.state()
    out = home.root.parent / f"cli-pull-{uuid.uuid4().hex}"
    for args in (
        ["registry", "publish", str(home.lora), name],
        ["registry", "show", name],
        ["registry", "pull", name, "--out", str(out)],
        ["registry", "delete", name],
    ):
        result = run_cli(*args, env=home.env)
        assert result.returncode == 2, (args[1], result.stdout, result.stderr)
        assert "Traceback" not in result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), (args[1], result.stderr[:500])
        assert message in lines[0], (args[1], lines[0])
        assert result.stdout == ""
    assert not out.exists()
    assert home.state() == before


def test_cli_prints_markup_in_a_name_as_it_is(home: Home) -> None:
    # Rich reads '[...]' as markup: a name must be printed, never interpreted.
    result = run_cli("registry", "show", "acme/[/bold]x", env=home.env)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "adapter name '[/bold]x' is not valid" in result.stderr


# -- the resolver vLLM loads ------------------------------------------------------------------


@pytest.fixture(scope="module")
def resolver(home: Home) -> Iterator[tuple[AdapterdeckResolver, Path]]:
    cache = home.root / "cache" / "adapters"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ADAPTERDECK_HOME", str(home.root))
        mp.setenv("ADAPTERDECK_CACHE_DIR", str(cache))
        yield AdapterdeckResolver(), cache


def test_the_resolver_serves_a_sound_ref_from_inside_its_cache(
    resolver: tuple[AdapterdeckResolver, Path], base_model: Path
) -> None:
    res, cache = resolver
    path = res.materialize(str(base_model), "acme/support@1")
    assert path is not None and Path(path).parent == cache
    assert sorted(p.name for p in Path(path).iterdir()) == ["README.md", CONFIG, WEIGHTS]


@pytest.mark.parametrize(("name", "message"), NAMES, ids=NAME_IDS)
def test_the_resolver_refuses_the_name(
    resolver: tuple[AdapterdeckResolver, Path], base_model: Path, home: Home, name: str, message: str
) -> None:
    res, cache = resolver
    before = sorted(cache.rglob("*")) if cache.exists() else []
    assert res.materialize(str(base_model), name) is None
    assert (sorted(cache.rglob("*")) if cache.exists() else []) == before
    assert files_outside(home.root.parent, [home.root]) == []


def test_the_resolver_refuses_what_is_not_a_name(
    resolver: tuple[AdapterdeckResolver, Path], base_model: Path
) -> None:
    res, _ = resolver
    for value in (None, 1, b"acme/support@1", ["acme/support@1"]):
        assert res.materialize(str(base_model), value) is None  # type: ignore[arg-type]
    assert res.materialize(str(base_model), "acme/support") is None  # movable: never to vLLM
    assert res.materialize(str(base_model), "acme/support@2") is None  # no such version


# -- files in an adapter directory ------------------------------------------------------------


def _symlink_outside(d: Path) -> None:
    secret = d.parent / f"secret-{d.name}.txt"
    secret.write_text("not for the registry\n")
    (d / "README.md").unlink()
    (d / "README.md").symlink_to(secret)


def _symlinked_weights(d: Path) -> None:
    real = d.parent / f"weights-{d.name}"
    (d / WEIGHTS).rename(real)
    (d / WEIGHTS).symlink_to(real)


def _symlink_to_device(d: Path) -> None:
    (d / CONFIG).unlink()
    (d / CONFIG).symlink_to("/dev/zero")  # read it and the publish never ends


def _non_utf8_name(d: Path) -> None:
    fd = os.open(os.fsencode(d) + b"/notes-\xff\xfe.txt", os.O_WRONLY | os.O_CREAT, 0o644)
    os.close(fd)


# (case, change to a sound adapter directory, a reason the refusal must give)
DIRECTORIES: list[tuple[str, Callable[[Path], Any], str]] = [
    ("extra-file", lambda d: (d / "notes.txt").write_text("x"), "unexpected file 'notes.txt'"),
    ("script", lambda d: (d / "run.sh").write_text("rm -rf /"), "unexpected file 'run.sh'"),
    ("backslash", lambda d: (d / "..\\x").write_text("x"), "file name '..\\\\x' is a path"),
    ("control", lambda d: (d / "a\x1b[2Jb").write_text("x"), "contains control or invisible characters"),
    ("rtl", lambda d: (d / "x\u202etxt.sh").write_text("x"), "contains control or invisible characters"),
    ("zero-width", lambda d: (d / f"{CONFIG}\u200b").write_text("{}"), "contains control or invisible"),
    ("fullwidth", lambda d: (d / "\uff41dapter_config.json").write_text("{}"), "unexpected file"),
    ("not-utf8", _non_utf8_name, "is not valid UTF-8"),
    ("symlink-out", _symlink_outside, "README.md is a symbolic link"),
    ("symlink-weights", _symlinked_weights, f"{WEIGHTS} is a symbolic link"),
    ("symlink-device", _symlink_to_device, f"{CONFIG} is a symbolic link"),
    ("subdirectory", lambda d: (d / "extra").mkdir(), "extra/ is a directory"),
    ("fifo", lambda d: os.mkfifo(d / META), f"{META} is not a regular file"),
    ("pickle-too", lambda d: (d / "adapter_model.bin").write_bytes(b"\x80\x04K\x01."), "pickled weights"),
    ("empty", lambda d: [p.unlink() for p in d.iterdir()], "is empty"),
]


def _adapter_copy(home: Home, tmp_path: Path, case: str) -> Path:
    d = tmp_path / case
    shutil.copytree(home.lora, d)
    return d


@pytest.mark.parametrize(("case", "change", "reason"), DIRECTORIES, ids=[c for c, _, _ in DIRECTORIES])
def test_publish_refuses_a_directory_with_files_it_should_not_have(
    home: Home, tmp_path: Path, case: str, change: Callable[[Path], Any], reason: str
) -> None:
    directory = _adapter_copy(home, tmp_path, case)
    change(directory)
    before = home.state()
    for target in ("acme/support", f"acme/refused-{case}"):
        with pytest.raises(PublishRefused) as refused:
            home.registry.publish(directory, target)
        assert any(reason in r for r in refused.value.reasons), refused.value.reasons
    with pytest.raises(PublishRefused):
        home.registry.validate(directory)
    assert home.state() == before  # no version, no adapter, no blob


# -- safetensors files ------------------------------------------------------------------------


def _split_safetensors(data: bytes) -> tuple[dict[str, Any], bytes]:
    (length,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + length]), data[8 + length :]


def _join_safetensors(header: dict[str, Any] | bytes, body: bytes) -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + body


def _tensors_by_offset(header: dict[str, Any]) -> list[str]:
    return sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])


def _edit_header(edit: Callable[[dict[str, Any]], Any]) -> Callable[[bytes], bytes]:
    def apply(data: bytes) -> bytes:
        header, body = _split_safetensors(data)
        edit(header)
        return _join_safetensors(header, body)

    return apply


def _first(header: dict[str, Any]) -> dict[str, Any]:
    return header[_tensors_by_offset(header)[0]]


def _overlap(header: dict[str, Any]) -> None:
    """The second of two same-sized tensors claims the first one's bytes."""
    by_size: dict[int, str] = {}
    for key in _tensors_by_offset(header):
        start, stop = header[key]["data_offsets"]
        if stop - start in by_size:
            header[key]["data_offsets"] = list(header[by_size[stop - start]]["data_offsets"])
            return
        by_size[stop - start] = key
    raise AssertionError("no two tensors of the same size")


def _double_first_dimension(header: dict[str, Any]) -> None:
    shape = _first(header)["shape"]
    shape[0] *= 2


def _outside(header: dict[str, Any]) -> None:
    last = header[_tensors_by_offset(header)[-1]]
    start, stop = last["data_offsets"]
    last["data_offsets"] = [start + 1024, stop + 1024]


def _deep_header(_: bytes) -> bytes:
    return _join_safetensors(b"[" * 100_000 + b"]" * 100_000, b"")


# (case, new file bytes from the sound file's, a reason the refusal must give)
WEIGHT_FILES: list[tuple[str, Callable[[bytes], bytes], str]] = [
    ("truncated", lambda d: d[: len(d) // 2], f"{WEIGHTS} is truncated: its header needs"),
    ("garbage", lambda d: random.Random(0).randbytes(4096), "does not fit the file"),
    ("absurd-length", lambda d: struct.pack("<Q", 2**60) + d[8:], "header length 1152921504606846976"),
    ("short", lambda d: d[:5], "is 5 bytes: too short to be safetensors"),
    ("zero-bytes", lambda d: b"", "is 0 bytes: too short"),
    ("header-not-utf8", lambda d: _join_safetensors(b'{"\xff\xfe": 1}', b""), "the header is not UTF-8"),
    ("header-not-json", lambda d: _join_safetensors(b"{weights: yes}", b""), "the header is not valid JSON"),
    ("header-array", lambda d: _join_safetensors(b"[1, 2, 3]", b""), "the header is a JSON array"),
    ("header-deep", _deep_header, "the header nests JSON too deeply"),
    ("entry-number", _edit_header(lambda h: h.update(x=5)), "tensor 'x' has a malformed header entry"),
    ("dtype-unknown", _edit_header(lambda h: _first(h).update(dtype="F128")), "has unknown dtype 'F128'"),
    ("dtype-list", _edit_header(lambda h: _first(h).update(dtype=["F32"])), "has unknown dtype"),
    ("shape-string", _edit_header(lambda h: _first(h).update(shape="8x128")), "shape must be a list"),
    ("shape-negative", _edit_header(lambda h: _first(h).update(shape=[-8, -128])), "shape must be a list"),
    ("offsets-strings", _edit_header(lambda h: _first(h).update(data_offsets=["0", "4"])), "data_offsets"),
    ("offsets-reversed", _edit_header(lambda h: _first(h).update(data_offsets=[4096, 0])), "data_offsets"),
    ("dtype-lie", _edit_header(lambda h: _first(h).update(dtype="F16")), "does not fill its"),
    ("shape-lie", _edit_header(_double_first_dimension), "does not fill its"),
    ("overlap", _edit_header(_overlap), "overlap"),
    ("outside-data", _edit_header(_outside), f"{WEIGHTS} is truncated: its header needs"),
    ("trailing-bytes", lambda d: d + b"\x00" * 16, "16 bytes after the last tensor belong to no tensor"),
    ("metadata", _edit_header(lambda h: h.update(__metadata__={"format": 5})), "__metadata__ must map"),
]  # fmt: skip


@pytest.mark.parametrize(("case", "corrupt", "reason"), WEIGHT_FILES, ids=[c for c, _, _ in WEIGHT_FILES])
def test_publish_refuses_a_malformed_safetensors_file(
    home: Home, tmp_path: Path, case: str, corrupt: Callable[[bytes], bytes], reason: str
) -> None:
    directory = _adapter_copy(home, tmp_path, case)
    (directory / WEIGHTS).write_bytes(corrupt((home.lora / WEIGHTS).read_bytes()))
    before = home.state()
    with pytest.raises(PublishRefused) as refused:
        home.registry.publish(directory, f"acme/refused-{case}")
    assert any(reason in r for r in refused.value.reasons), refused.value.reasons
    assert home.state() == before


def test_a_header_length_claiming_an_absurd_size_allocates_nothing(tmp_path: Path) -> None:
    absurd = tmp_path / "absurd.safetensors"
    absurd.write_bytes(struct.pack("<Q", 2**60) + b"{}")
    # A file as large as the header it claims (sparse: no disk used) is refused by the header limit.
    sparse = tmp_path / "sparse.safetensors"
    with sparse.open("wb") as fh:
        fh.write(struct.pack("<Q", 150_000_000) + b"{")
        fh.truncate(150_000_100)
    tracemalloc.start()
    try:
        _, absurd_problems = read_safetensors_header(absurd)
        _, sparse_problems = read_safetensors_header(sparse)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert absurd_problems == [
        "absurd.safetensors: header length 1152921504606846976 does not fit the file (10 bytes); "
        "truncated, or not a safetensors file?"
    ]
    assert sparse_problems == [
        "sparse.safetensors: the header is 150,000,000 bytes; the limit is 100,000,000"
    ]
    assert peak < 1 << 20, f"{peak:,} bytes allocated"


def test_the_sound_safetensors_file_passes_every_check(home: Home) -> None:
    tensors, problems = read_safetensors_header(home.lora / WEIGHTS)
    assert problems == [] and len(tensors) == 2 * 7 * 2  # A and B, 7 modules, 2 layers


# -- adapter_config.json, adapterdeck.json, report.json ---------------------------------------


def _config_with(**changes: Any) -> Callable[[Path], None]:
    def apply(d: Path) -> None:
        config = json.loads((d / CONFIG).read_text())
        config.update(changes)
        (d / CONFIG).write_text(json.dumps(config))

    return apply


def _write(name: str, data: bytes | str) -> Callable[[Path], None]:
    def apply(d: Path) -> None:
        (d / name).write_bytes(data.encode() if isinstance(data, str) else data)

    return apply


def _without(name: str) -> Callable[[Path], None]:
    return lambda d: (d / name).unlink()


def _huge_config(d: Path) -> None:
    config = json.loads((d / CONFIG).read_text())
    config["revision"] = "x" * (2 << 20)
    (d / CONFIG).write_text(json.dumps(config))


CONFIGS: list[tuple[str, Callable[[Path], Any], str]] = [
    ("not-json", _write(CONFIG, '{"r": 8,'), f"{CONFIG} is not valid JSON: Expecting property name"),
    ("array", _write(CONFIG, "[8, 16]"), f"{CONFIG} must hold a JSON object; it holds a JSON array"),
    ("string", _write(CONFIG, '"lora"'), "it holds a JSON string"),
    ("not-utf8", _write(CONFIG, b'{"r": "\xff"}'), f"{CONFIG} is not UTF-8 text"),
    ("huge", _huge_config, f"{CONFIG} is 2,09"),
    ("deep", _write(CONFIG, "[" * 100_000 + "]" * 100_000), f"{CONFIG} nests JSON more than 64 levels"),
    ("deep-object", _write(CONFIG, '{"r": ' + "[" * 200 + "]" * 200 + "}"), "more than 64 levels deep"),
    ("nan", _config_with(lora_dropout=float("nan")), "NaN is not a JSON value"),
    ("long-integer", _write(CONFIG, '{"r": ' + "9" * 5000 + "}"), f"{CONFIG} is not valid JSON: Exceeds"),
    ("r-word", _config_with(r="eight"), 'r must be a positive integer, got "eight"'),
    ("r-negative", _config_with(r=-1), "r must be a positive integer, got -1"),
    ("r-zero", _config_with(r=0), "r must be a positive integer, got 0"),
    ("r-float", _config_with(r=1e9), "r must be a positive integer, got 1000000000.0"),
    ("r-bool", _config_with(r=True), "r must be a positive integer, got true"),
    ("r-lie", _config_with(r=10**9), "has rank 8, but adapter_config.json says r=1000000000"),
    ("targets-number", _config_with(target_modules=5), "target_modules must be a list of module names"),
    ("targets-empty", _config_with(target_modules=[]), "target_modules must be a list of module names"),
    ("targets-mixed", _config_with(target_modules=["q_proj", 5]), "target_modules must be a list"),
    ("alpha-null", _config_with(lora_alpha=None), "lora_alpha must be a number, got null"),
    ("alpha-string", _config_with(lora_alpha="16"), 'lora_alpha must be a number, got "16"'),
    ("dropout", _config_with(lora_dropout=2), "lora_dropout must be a number from 0 to 1, got 2"),
    ("rank-pattern", _config_with(rank_pattern={"q_proj": "x"}), "rank_pattern must be an object of"),
    ("bias", _config_with(bias=["none"]), "bias must be 'none', 'all' or 'lora_only'"),
    ("peft-type", _config_with(peft_type="SHELL"), 'peft_type "SHELL" is not an adapter type PEFT knows'),
    ("peft-type-number", _config_with(peft_type=5), "peft_type 5 is not an adapter type PEFT knows"),
    ("peft-type-missing", _config_with(peft_type=None), "peft_type null is not an adapter type"),
    ("base-number", _config_with(base_model_name_or_path=5), "base_model_name_or_path must be a string"),
    ("no-config", _without(CONFIG), f"no {CONFIG}"),
    ("meta-array", _write(META, "[]"), f"{META} must hold a JSON object; it holds a JSON array"),
    ("meta-not-json", _write(META, "{"), f"{META} is not valid JSON"),
    ("meta-served-by", _write(META, '{"served_by": "vllm"}'), 'must be a list of vllm, peft, got "vllm"'),
    ("meta-engine", _write(META, '{"served_by": ["gpu"]}'), "served_by must be a list of vllm, peft"),
    ("meta-fingerprint", _write(META, '{"base_fingerprint": 5}'), "base_fingerprint must be a string, got 5"),
    ("meta-method", _write(META, '{"method": ["lora"]}'), "method must be a string"),
    ("meta-params", _write(META, '{"params": "r=8"}'), "params must be an object"),
]  # fmt: skip


@pytest.mark.parametrize(("case", "change", "reason"), CONFIGS, ids=[c for c, _, _ in CONFIGS])
def test_publish_refuses_a_malformed_config(
    home: Home, tmp_path: Path, case: str, change: Callable[[Path], Any], reason: str
) -> None:
    directory = _adapter_copy(home, tmp_path, case)
    change(directory)
    before = home.state()
    with pytest.raises(PublishRefused) as refused:
        home.registry.publish(directory, f"acme/refused-{case}")
    assert any(reason in r for r in refused.value.reasons), refused.value.reasons
    assert all(len(r) < 400 for r in refused.value.reasons), refused.value.reasons
    assert home.state() == before


@pytest.mark.parametrize(
    ("report", "reason"),
    [
        ("{", "report.json is not valid JSON"),
        ("[]", "report.json must hold a JSON object"),
        ('{"data": "x"}', 'report.json: data must be an object, got "x"'),
        ('{"data": {"sha256": 5}}', "report.json: data.sha256 must be a string"),
        ('{"versions": {"torch": 2}}', "report.json: versions must map library names to version strings"),
    ],
)
def test_publish_refuses_a_run_whose_report_is_malformed(
    home: Home, tmp_path: Path, report: str, reason: str
) -> None:
    run = tmp_path / "run"
    shutil.copytree(home.lora, run / "adapter")
    (run / "report.json").write_text(report)
    before = home.state()
    with pytest.raises(PublishRefused) as refused:
        home.registry.publish(run, "acme/refused-run")
    assert any(reason in r for r in refused.value.reasons), refused.value.reasons
    assert home.state() == before


def test_cli_publish_and_validate_list_the_reasons_without_a_traceback(home: Home, tmp_path: Path) -> None:
    directory = _adapter_copy(home, tmp_path, "cli")
    _config_with(r="eight", lora_alpha=None)(directory)
    (directory / "notes.txt").write_text("x")
    (directory / WEIGHTS).write_bytes(struct.pack("<Q", 2**60) + b"{}")
    before = home.state()
    for args in (["publish", str(directory), "acme/cli"], ["validate", str(directory)]):
        result = run_cli("registry", *args, env=home.env)
        assert result.returncode == 2, result.stdout + result.stderr
        assert "Traceback" not in result.stderr and result.stdout == ""
        assert result.stderr.startswith(f"error: refused {directory}: 4 problem(s):")
        for reason in (
            "unexpected file 'notes.txt'",
            'r must be a positive integer, got "eight"',
            "lora_alpha must be a number, got null",
            "header length 1152921504606846976 does not fit the file",
        ):
            assert reason in result.stderr, result.stderr
    assert home.state() == before


# -- pull and materialize never write outside their target ------------------------------------


@pytest.fixture
def damaged(home: Home, tmp_path: Path) -> Iterator[tuple[Registry, str]]:
    """A registry of its own with one version, whose records a test may damage."""
    reg = Registry(RegistrySettings(home=tmp_path / "home"))
    info = reg.publish(home.lora, "acme/damaged")
    yield reg, info.ref
    reg.close()


@pytest.mark.parametrize(
    "stored",
    ["../escaped", "../../escaped", "/tmp/adapterdeck-escaped", "sub/escaped", "..", "a\\b", "a\x00b", ""],
)
def test_pull_and_materialize_refuse_a_stored_file_name_that_is_a_path(
    damaged: tuple[Registry, str], tmp_path: Path, stored: str, base_model: Path
) -> None:
    reg, ref = damaged
    with reg.engine.begin() as conn:
        conn.execute(update(t.version_files).where(t.version_files.c.path == "README.md").values(path=stored))
    out, cache = tmp_path / "out" / "adapter", tmp_path / "home" / "cache"
    with pytest.raises(AdapterdeckError, match="refusing to write its files"):
        reg.pull(ref, out)
    with pytest.raises(AdapterdeckError, match="refusing to write its files"):
        reg.materialize(reg.show(ref), cache)
    assert not out.exists() and not (tmp_path / "out").exists()
    assert not Path("/tmp/adapterdeck-escaped").exists()
    assert files_outside(tmp_path, [tmp_path / "home"]) == []

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ADAPTERDECK_HOME", str(tmp_path / "home"))
        mp.delenv("ADAPTERDECK_CACHE_DIR", raising=False)
        assert AdapterdeckResolver().materialize(str(base_model), ref) is None
    assert files_outside(tmp_path, [tmp_path / "home"]) == []
    assert not (tmp_path / "home" / "cache" / "adapters").exists() or not any(
        p.is_file() for p in (tmp_path / "home" / "cache" / "adapters").rglob("*")
    )


def test_pull_and_materialize_refuse_a_stored_digest_that_is_a_path(
    damaged: tuple[Registry, str], tmp_path: Path
) -> None:
    reg, ref = damaged
    with reg.engine.begin() as conn:
        conn.execute(
            update(t.version_files).where(t.version_files.c.path == "README.md").values(sha256="../../../x")
        )
    with pytest.raises(AdapterdeckError, match="is not a sha256 digest"):
        reg.pull(ref, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    with reg.engine.begin() as conn:
        conn.execute(update(t.versions).values(manifest_sha256="../../../escaped"))
    with pytest.raises(AdapterdeckError, match="manifest digest is damaged"):
        reg.materialize(reg.show(ref), tmp_path / "home" / "cache")
    assert files_outside(tmp_path, [tmp_path / "home"]) == []


# -- JSONL training data ----------------------------------------------------------------------


def chat_line(user: str, answer: str) -> bytes:
    return json.dumps(
        {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]}
    ).encode()


BIG = 10 * 1024 * 1024
_NOT_UTF8 = chat_line("caf", "x").replace(b"caf", b"caf\xe9")
_HUGE = chat_line("a" * BIG, "x")
_NUL = chat_line("n", "x").replace(b'"n"', b'"\x00"')
# line number -> (the line's bytes, without its newline; a fragment its reason must contain)
HOSTILE_LINES: dict[int, tuple[bytes, str]] = {
    3: (_NOT_UTF8, f"not valid UTF-8 (byte {_NOT_UTF8.index(0xE9) + 1})"),
    4: (_HUGE, f"the line is {len(_HUGE):,} bytes, over the limit of 1,048,576 bytes a line"),
    5: (b"[" * 100_000 + b"]" * 100_000, "invalid JSON: nested too deeply"),
    6: (_NUL, f"contains a NUL byte (byte {_NUL.index(0) + 1})"),
    7: (chat_line("\x00", "x"), "message 1: content contains a NUL character (\\u0000)"),
    8: (chat_line("x", "y").replace(b'"x"', b'"\\ud800"'), "contains an unpaired surrogate (\\ud800)"),
    9: (b'{"messages": ' + b"9" * 5000 + b"}", "invalid JSON: Exceeds the limit (4300 digits)"),
    10: (b"\xef\xbb\xbf" + chat_line("bom", "x"), "invalid JSON: Unexpected UTF-8 BOM"),
    11: (b'{"messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "invalid JSON: nested too deeply"),
    13: (bytes(range(0x80, 0xC0)) * 8, "not valid UTF-8 (byte 1)"),
    14: (json.dumps({"messages": [{"role": "r" * 100_000, "content": "x"}]}).encode(), "unknown role 'rrrr"),
    15: (
        json.dumps({"instruction": "x", "output": "y"}).encode(),
        "this line is alpaca, but the file is chat",
    ),
}
GOOD_LINES = {
    1: b"\xef\xbb\xbf" + chat_line("first, after a byte order mark", "ok"),
    2: chat_line("a CRLF line", "ok") + b"\r",
    12: chat_line("a good line among bad ones", "ok"),
}


@pytest.fixture(scope="module")
def hostile_jsonl(tmp_path_factory: pytest.TempPathFactory) -> Path:
    lines = {**{n: b for n, (b, _) in HOSTILE_LINES.items()}, **GOOD_LINES}
    path = tmp_path_factory.mktemp("data") / "hostile.jsonl"
    with path.open("wb") as fh:
        for number in range(1, max(lines) + 1):
            fh.write(lines[number] + b"\n")
    return path


def test_validate_names_every_hostile_line_with_its_reason(hostile_jsonl: Path) -> None:
    good = hostile_jsonl.parent / "good.jsonl"
    good.write_bytes(chat_line("q", "a") + b"\n")
    validate_file(good)  # plugins loaded, imports done: measure only the reading
    tracemalloc.start()
    try:
        report = validate_file(hostile_jsonl)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert report.format == "chat" and report.lines == 15
    assert [e.line for e in report.errors] == sorted(HOSTILE_LINES)
    for error in report.errors:
        assert HOSTILE_LINES[error.line][1] in "; ".join(error.reasons), error
        assert len(str(error)) < 300, str(error)[:400]  # the 100,000-character role is cut short
    assert [c.line for c in report.examples] == sorted(GOOD_LINES)
    # The 10 MB line is skipped over, never held: memory stays near the 1 MiB line limit.
    assert peak < 4 << 20, f"{peak:,} bytes at the peak"


def test_cli_validate_names_every_hostile_line(hostile_jsonl: Path) -> None:
    result = run_cli("data", "validate", str(hostile_jsonl))
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert f"{len(HOSTILE_LINES)} bad line(s):" in result.stdout
    for number, (_, reason) in HOSTILE_LINES.items():
        assert f"line {number}: " in result.stdout and reason in result.stdout, number
    as_json = json.loads(run_cli("data", "validate", str(hostile_jsonl), "--json").stdout)
    assert [e["line"] for e in as_json["errors"]] == sorted(HOSTILE_LINES)


def test_max_line_bytes_is_configurable(tmp_path: Path) -> None:
    path = tmp_path / "long.jsonl"
    long = chat_line("l" * 2000, "ok")
    path.write_bytes(chat_line("short", "ok") + b"\n" + long + b"\n")
    assert validate_file(path).ok
    report = validate_file(path, max_line_bytes=1000)
    assert [(e.line, e.reasons) for e in report.errors] == [
        (2, (f"the line is {len(long):,} bytes, over the limit of 1,000 bytes a line",))
    ]
    assert [c.line for c in report.examples] == [1]
    assert run_cli("data", "validate", str(path)).returncode == 0
    result = run_cli("data", "validate", str(path), "--max-line-bytes", "1000")
    assert result.returncode == 1
    assert f"line 2: the line is {len(long):,} bytes, over the limit of 1,000 bytes" in result.stdout
    refused = run_cli("data", "validate", str(path), "--max-line-bytes", "0")
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    with pytest.raises(AdapterdeckError, match="max_line_bytes must be a positive number"):
        validate_file(path, max_line_bytes=0)


def test_a_file_that_is_not_text_is_named_line_by_line(tmp_path: Path) -> None:
    path = tmp_path / "random.bin"
    path.write_bytes(random.Random(7).randbytes(64 * 1024))
    report = validate_file(path)
    assert not report.ok and report.examples == [] and report.format is None
    data = path.read_bytes()
    assert report.lines == data.count(b"\n") + (0 if data.endswith(b"\n") else 1)
    assert all(e.line >= 1 and e.reasons for e in report.errors)
    assert {e.line for e in report.errors} <= set(range(1, report.lines + 1))
    result = run_cli("data", "validate", str(path))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "line 1: " in result.stdout


def test_empty_and_unreadable_files(tmp_path: Path) -> None:
    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(b"")
    report = validate_file(empty)
    assert [str(e) for e in report.errors] == ["the file has no examples"] and report.lines == 0
    result = run_cli("data", "validate", str(empty))
    assert result.returncode == 1 and "the file has no examples" in result.stdout
    for path in (tmp_path, tmp_path / "a\x00b.jsonl"):
        with pytest.raises(AdapterdeckError, match="cannot read"):
            validate_file(path)
    result = run_cli("data", "validate", str(tmp_path))
    assert result.returncode == 2 and "cannot read" in result.stderr and "Traceback" not in result.stderr


def test_markup_in_a_file_name_is_printed_as_it_is(tmp_path: Path) -> None:
    (tmp_path / "[").mkdir()
    path = tmp_path / "[" / "red]data[bold].jsonl"  # the path reads '.../[/red]data[bold].jsonl'
    path.write_bytes(chat_line("q", "a") + b"\n")
    result = run_cli("data", "validate", str(path))
    assert result.returncode == 0 and "Traceback" not in result.stderr
    assert f"{path}: chat format" in result.stdout


def test_training_refuses_hostile_data_and_trains_nothing(
    hostile_jsonl: Path, base_model: Path, tmp_path: Path
) -> None:
    with pytest.raises(DataError) as refused:
        load_examples(hostile_jsonl)
    assert "nothing was trained" in str(refused.value)
    for number in HOSTILE_LINES:
        assert f"line {number}: " in str(refused.value)

    run = tmp_path / "run"
    config = tmp_path / "run.yaml"
    config.write_text(
        json.dumps({"base": str(base_model), "data": {"train": str(hostile_jsonl)}, "output": str(run)})
    )
    result = run_cli("train", str(config))
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert "nothing was trained" in result.stderr
    for number in HOSTILE_LINES:
        assert f"line {number}: " in result.stderr
    assert not (run / "adapter").exists()


def test_training_takes_max_line_bytes_from_the_run_config(base_model: Path, tmp_path: Path) -> None:
    data = tmp_path / "data.jsonl"
    data.write_bytes(b"".join(chat_line(f"question {i} " * 40, f"answer {i}") + b"\n" for i in range(12)))
    config = tmp_path / "run.yaml"
    for limit, expected in ((0, "data.max_line_bytes"), (100, "over the limit of 100 bytes a line")):
        body = {"base": str(base_model), "data": {"train": str(data), "max_line_bytes": limit}}
        config.write_text(json.dumps({**body, "output": str(tmp_path / "run")}))
        result = run_cli("train", str(config))
        assert result.returncode == 2 and expected in result.stderr, result.stderr[-2000:]
        assert "Traceback" not in result.stderr
    assert not (tmp_path / "run" / "adapter").exists()


# -- HTTP: the gateway ------------------------------------------------------------------------


@dataclass
class Gateway:
    port: int
    admin: str
    tenant: str
    log: Path

    def request(
        self, method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None, key: str = ""
    ) -> tuple[int, Any]:
        """Send ``path`` byte for byte (no client-side normalisation); the status and decoded JSON body."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        try:
            conn.putrequest(method, path, skip_accept_encoding=True)
            every = {"Authorization": f"Bearer {key or self.admin}", "Content-Length": str(len(body))}
            for name, value in {**every, **(headers or {})}.items():
                conn.putheader(name, value)
            conn.endheaders()
            conn.send(body)
            response = conn.getresponse()
            raw = response.read()
        finally:
            conn.close()
        try:
            return response.status, json.loads(raw)
        except ValueError:
            raise AssertionError(f"{response.status}: not JSON: {raw[:300]!r}") from None

    def publish(self, tenant_name: str, files: list[tuple[bytes, bytes]]) -> tuple[int, Any]:
        boundary = uuid.uuid4().hex
        body = b""
        for filename, content in files:
            body += (
                f"--{boundary}\r\n".encode()
                + b'Content-Disposition: form-data; name="files"; filename="'
                + filename
                + b'"\r\nContent-Type: application/octet-stream\r\n\r\n'
                + content
                + b"\r\n"
            )
        body += f"--{boundary}--\r\n".encode()
        headers = {"Content-Type": f"multipart/form-data; boundary={boundary}"}
        return self.request("POST", f"/v1/adapters/{tenant_name}/versions", body, headers)

    def chat(self, model: Any, key: str = "") -> tuple[int, Any]:
        body = json.dumps({"model": model, "messages": [{"role": "user", "content": "hi"}]}).encode()
        return self.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"}, key)


@pytest.fixture(scope="module")
def gateway(home: Home, base_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    unused = free_port()  # no vLLM: these endpoints never reach an engine
    process = start_gateway(
        base_model,
        f"http://127.0.0.1:{unused}",
        home.env,
        tmp_path_factory.mktemp("gateway"),
        served_name="tiny",
        ready=lambda reply: "status" in reply.json(),  # answering (no vLLM here)
    )
    port = int(process.url.rsplit(":", 1)[1])
    try:
        yield Gateway(port, create_key(home.registry, None), create_key(home.registry, "acme"), process.log)
    finally:
        process.stop()


def _sound_upload(home: Home) -> list[tuple[bytes, bytes]]:
    return [
        (CONFIG.encode(), (home.lora / CONFIG).read_bytes()),
        (WEIGHTS.encode(), (home.lora / WEIGHTS).read_bytes()),
    ]


def test_http_publish_of_a_sound_adapter_works(gateway: Gateway, home: Home) -> None:
    # The control case: the refusals below are refusals of the input, not of every request.
    status, body = gateway.publish("acme/http-sound", _sound_upload(home))
    assert status == 201, body
    assert body["ref"] == "acme/http-sound@1"


def _percent(text: str) -> str:
    """Percent-encode every byte that is not a plain ASCII letter or digit (as a hostile client may)."""
    return "".join(
        c if c.isascii() and c.isalnum() else "".join(f"%{b:02X}" for b in c.encode()) for c in text
    )


# Names that go into the URL path; a 100,000-character path is refused by the HTTP server itself.
HTTP_NAMES = [(n, m) for n, m in NAMES if "@" not in n and ":" not in n and len(n) < 1000]


@pytest.mark.parametrize(("name", "message"), HTTP_NAMES, ids=[repr(n)[1:-1][:28] for n, _ in HTTP_NAMES])
def test_http_publish_refuses_the_name(gateway: Gateway, home: Home, name: str, message: str) -> None:
    before = home.state()
    tenant, _, adapter = name.partition("/")
    status, body = gateway.publish(f"{_percent(tenant)}/{_percent(adapter)}", _sound_upload(home))
    # A '/' decoded out of the path no longer matches the route (404); any other name is refused (400).
    assert status in (400, 404), (status, body)
    if status == 400:
        assert message in body["error"]["message"] or "characters long" in body["error"]["message"], body
    assert home.state() == before


HTTP_MODELS: list[Any] = [name for name, _ in NAMES] + [
    "acme/support:../../x",
    "ft:../../etc/passwd",
    "ft:\x00",
]


@pytest.mark.parametrize("model", HTTP_MODELS, ids=[repr(m)[1:-1][:28] for m in HTTP_MODELS])
def test_http_model_field_refuses_the_name(gateway: Gateway, model: str) -> None:
    for key in (gateway.admin, gateway.tenant):
        status, body = gateway.chat(model, key)
        assert status == 404, (status, body)
        assert body["error"]["code"] == "model_not_found" and body["error"]["param"] == "model"


def test_http_model_field_of_the_wrong_type_is_a_400(gateway: Gateway) -> None:
    for model in (None, 5, ["acme/support@1"], {"tenant": "acme"}, True, ""):
        status, body = gateway.chat(model)
        assert status == 400 and body["error"]["param"] == "model", (model, status, body)


HTTP_WEIGHTS = [w for w in WEIGHT_FILES if w[0] in {"absurd-length", "header-deep", "overlap", "garbage"}]


@pytest.mark.parametrize(("case", "corrupt", "reason"), HTTP_WEIGHTS, ids=[c for c, _, _ in HTTP_WEIGHTS])
def test_http_publish_refuses_malformed_weights_with_the_reason(
    gateway: Gateway, home: Home, case: str, corrupt: Callable[[bytes], bytes], reason: str
) -> None:
    before = home.state()
    upload = [
        (CONFIG.encode(), (home.lora / CONFIG).read_bytes()),
        (WEIGHTS.encode(), corrupt((home.lora / WEIGHTS).read_bytes())),
    ]
    status, body = gateway.publish(f"acme/http-{case}", upload)
    assert status == 400 and reason in body["error"]["message"], (status, body)
    assert home.state() == before


# (file name in the multipart upload, its content: a sound file the name tries to slip in or replace)
UPLOAD_NAMES: list[Any] = [
    pytest.param(b"../" + CONFIG.encode(), "config", id="dotdot-config"),
    pytest.param(b"/tmp/" + META.encode(), "meta", id="absolute-meta"),
    pytest.param(b"C:\\x\\" + CONFIG.encode(), "config", id="windows-path"),
    pytest.param(CONFIG.encode(), "config", id="duplicate"),
    pytest.param(b"a\x00b", "x", id="nul"),
    pytest.param(b"..", "x", id="dotdot"),
    pytest.param(b"", "x", id="empty"),
    pytest.param(b"/etc/passwd", "x", id="absolute"),
    pytest.param(b"a\\b", "x", id="backslash"),
    pytest.param(b"\x1b[31mred", "x", id="escape"),
    pytest.param("x\u202etxt.sh".encode(), "x", id="rtl"),
    pytest.param(b"notes.txt", "x", id="extra"),
]  # fmt: skip


@pytest.mark.parametrize(("filename", "content"), UPLOAD_NAMES)
def test_http_publish_refuses_a_file_name_that_is_not_a_plain_name(
    gateway: Gateway, home: Home, filename: bytes, content: str
) -> None:
    data = {
        "config": (home.lora / CONFIG).read_bytes(),
        "meta": json.dumps({"method": "lora", "served_by": ["vllm", "peft"]}).encode(),
        "x": b"x",
    }[content]
    before = home.state()
    name = f"acme/upload-{uuid.uuid4().hex[:8]}"
    status, body = gateway.publish(name, [*_sound_upload(home), (filename, data)])
    assert status == 400, (status, body)
    assert "error" in body and body["error"]["message"]
    assert home.state() == before
