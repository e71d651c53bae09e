"""The package installs from a built wheel (not only editable) with the package-dir mapping."""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path

from .conftest import ROOT


def test_built_wheel_installs_and_runs(tmp_path: Path) -> None:
    dist = tmp_path / "dist"
    subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--outdir", str(dist), str(ROOT)],
        check=True,
        capture_output=True,
    )
    (wheel,) = dist.glob("adapterdeck-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for expected in (
        "adapterdeck/core/hookspecs.py",
        "adapterdeck/core/data/corpus.txt",
        "adapterdeck/plugins/chat.py",
        "adapterdeck/registry/__init__.py",
        "adapterdeck/serve/__init__.py",
    ):
        assert expected in names
    assert not any(n.startswith(("core/", "plugins/", "tests/")) for n in names)

    # A clean virtual environment with only what listing plugins needs: no editable install.
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet"]
    subprocess.run([*pip, "--no-deps", str(wheel)], check=True, capture_output=True)
    subprocess.run([*pip, "pluggy", "typer", "rich", "pydantic"], check=True, capture_output=True)
    listed = subprocess.run(
        [str(venv / "bin" / "adapterdeck"), "plugins", "list", "--json"],
        capture_output=True,
        text=True,
        cwd=tmp_path,  # not the source tree
        check=True,
    )
    found = {(p["kind"], p["name"]) for p in json.loads(listed.stdout)["plugins"]}
    assert {("format", "chat"), ("format", "alpaca")} <= found
    where = subprocess.run(
        [str(venv / "bin" / "python"), "-c", "import adapterdeck.core as c; print(c.__file__)"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        check=True,
    )
    assert str(venv) in where.stdout
