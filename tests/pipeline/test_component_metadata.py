"""Every `components/<name>/` is a component folder as in opendatahub-io/pipelines-components: component.py,
README.md, tests of its own, and a metadata.yaml whose facts match this checkout (the kfp the project
installs, the vembed version, the image the component compiles with)."""

from __future__ import annotations

import datetime
import importlib
import tomllib
from pathlib import Path

import kfp
import pytest
import yaml
from kfp.dsl.python_component import PythonComponent
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

import vembed
from components import settings

ROOT = Path(__file__).resolve().parents[2]
FOLDERS = sorted(p.parent for p in (ROOT / "components").glob("*/component.py"))
REQUIRED = {"name", "stability", "dependencies", "baseImage", "lastVerified"}


def project_requirement(name: str) -> Requirement:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    return next(r for r in map(Requirement, deps) if r.name == name)


def test_every_pipeline_step_is_a_component_folder() -> None:
    assert {p.name for p in FOLDERS} == {"prepare", "train", "evaluate", "merge", "register", "deploy", "on_exit"}


@pytest.mark.parametrize("folder", FOLDERS, ids=lambda p: p.name)
def test_component_folder_and_its_metadata(folder: Path) -> None:
    assert (folder / "README.md").is_file() and (folder / "tests" / "test_component.py").is_file()
    meta = yaml.safe_load((folder / "metadata.yaml").read_text())
    assert REQUIRED <= set(meta), f"{folder.name}/metadata.yaml lacks {sorted(REQUIRED - set(meta))}"
    assert meta["name"] == folder.name and meta["stability"] in ("alpha", "beta", "stable")

    deps = meta["dependencies"]
    python = {d["name"]: d["version"] for d in deps["python"]}
    assert python["kfp"] == str(project_requirement("kfp").specifier), "the kfp bound pyproject.toml installs"
    assert kfp.__version__ in SpecifierSet(python["kfp"])
    assert vembed.__version__ in SpecifierSet(python["vembed"])
    assert any(d["name"] == "Pipelines" for d in deps["kubeflow"]), "the KFP backend floor"
    for dep in (d for group in deps.values() for d in group):
        SpecifierSet(dep.get("version", ""))  # a version range a tool can read; notes go in `note`

    # The image each component compiles with, unless VEMBED_IMAGE / VEMBED_TRAIN_IMAGE override it.
    module = importlib.import_module(f"components.{folder.name}.component")
    defaults = {settings.CPU_IMAGE: settings.DEFAULT_IMAGE, settings.GPU_IMAGE: settings.DEFAULT_TRAIN_IMAGE}
    images = {defaults[c.component_spec.implementation.container.image]
              for c in vars(module).values() if isinstance(c, PythonComponent)}  # fmt: skip
    assert images == {meta["baseImage"]}

    verified = meta["lastVerified"]
    verified = verified if isinstance(verified, datetime.datetime) else datetime.datetime.fromisoformat(str(verified))
    assert verified <= datetime.datetime.now(datetime.UTC)
