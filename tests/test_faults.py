"""Faults on the registry's disk: full, or read-only. A clear error, and nothing corrupted.

The registry home is a small tmpfs mounted here (root only), so the disk really fills up and the
file system really turns read-only; nothing else on the machine is touched.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from .conftest import run_cli
from .registry_helpers import check_version_complete, make_lora


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    mount = tmp_path / "disk"
    mount.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def _fill(directory: Path, leave: int) -> Path:
    """Fill the file system holding ``directory`` until ``leave`` bytes are free."""
    filler = directory / "filler"
    free = shutil.disk_usage(directory).free
    with filler.open("wb") as fh:
        fh.write(b"\0" * max(0, free - leave))
    return filler


def test_a_full_disk_refuses_the_publish_and_keeps_what_was_there(
    base_model: Path, small_disk: Path, tmp_path: Path
) -> None:
    env = {"ADAPTERDECK_HOME": str(small_disk / "home")}
    first = make_lora(base_model, tmp_path / "first", seed=1)
    second = make_lora(base_model, tmp_path / "second", seed=2)
    assert run_cli("registry", "publish", str(first), "acme/x", "--alias", "prod", env=env).returncode == 0
    filler = _fill(small_disk, leave=32 * 1024)  # less than the second adapter's weights
    result = run_cli("registry", "publish", str(second), "acme/x", env=env)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert "no space left" in (result.stderr + result.stdout).lower(), result.stderr
    # Nothing half-written is visible, and the first version is whole.
    listed = run_cli("registry", "list", "--json", env=env)
    assert listed.returncode == 0, listed.stderr
    assert '"versions": [\n      1\n    ]' in listed.stdout
    filler.unlink()
    from adapterdeck.registry import Registry, RegistrySettings

    registry = Registry(RegistrySettings(home=small_disk / "home"))
    try:
        check_version_complete(registry, "acme/x@1", tmp_path / "pulled")
        # With room again, the same publish works, and gc takes what the failed one left behind.
        assert registry.publish(second, "acme/x").ref == "acme/x@2"
        registry.gc(grace_seconds=0)
        check_version_complete(registry, "acme/x@2", tmp_path / "pulled2")
    finally:
        registry.close()


def test_a_read_only_registry_gives_a_clear_error(base_model: Path, small_disk: Path, tmp_path: Path) -> None:
    env = {"ADAPTERDECK_HOME": str(small_disk / "home")}
    first = make_lora(base_model, tmp_path / "first", seed=1)
    assert run_cli("registry", "publish", str(first), "acme/x", env=env).returncode == 0
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    try:
        result = run_cli(
            "registry", "publish", str(make_lora(base_model, tmp_path / "b", seed=2)), "acme/x", env=env
        )
        assert result.returncode != 0 and "Traceback" not in result.stderr
        assert "read-only" in (result.stderr + result.stdout).lower(), result.stderr
    finally:
        subprocess.run(["mount", "-o", "remount,rw", str(small_disk)], check=True)
    from adapterdeck.registry import Registry, RegistrySettings

    registry = Registry(RegistrySettings(home=small_disk / "home"))
    try:
        assert registry.list()[0]["versions"] == [1]
        check_version_complete(registry, "acme/x@1", tmp_path / "pulled")
    finally:
        registry.close()
