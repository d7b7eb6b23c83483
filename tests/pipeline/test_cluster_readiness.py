"""Small cluster-readiness checks: config_path inside the image, the images' user, compile options."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from vembed.errors import ConfigError
from vembed.pipeline.steps.train import IMAGE_HOME, resolve_config_path

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def image_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A stand-in for /opt/vembed, with the working directory elsewhere (as in a step's pod)."""
    home = tmp_path / "opt-vembed"
    (home / "examples").mkdir(parents=True)
    (home / "examples" / "production.yaml").write_text("epochs: 1\n")
    (home / "examples" / "minilm_demo.yaml").write_text("epochs: 2\n")
    work = tmp_path / "pod-cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setenv("VEMBED_HOME", str(home))
    return home


@pytest.mark.parametrize("given", ["examples/production.yaml", "production.yaml"])
def test_config_path_resolves_against_the_images_examples(image_home: Path, given: str) -> None:
    assert resolve_config_path(given) == str(image_home / "examples" / "production.yaml")


def test_config_path_as_given_wins(image_home: Path) -> None:
    local = Path("examples") / "production.yaml"
    local.parent.mkdir()
    local.write_text("epochs: 3\n")
    assert resolve_config_path("examples/production.yaml") == "examples/production.yaml"
    assert resolve_config_path(str(image_home / "examples" / "minilm_demo.yaml")).endswith("minilm_demo.yaml")
    assert resolve_config_path("") is None


def test_missing_config_path_says_where_it_looked_and_what_exists(image_home: Path) -> None:
    with pytest.raises(ConfigError) as err:
        resolve_config_path("examples/prodution.yaml")
    message = str(err.value)
    assert message.startswith("config_path examples/prodution.yaml: not found")
    assert str(image_home / "examples" / "examples" / "prodution.yaml") in message
    assert "the image's examples: minilm_demo.yaml, production.yaml" in message
    assert "\n" not in message


def test_the_train_step_reads_a_config_from_the_image(image_home: Path, tmp_path: Path) -> None:
    """The step itself, not just the helper: a relative example path reaches load_config resolved."""
    from vembed.pipeline.steps.train import resolve_config

    cfg = resolve_config(resolve_config_path("minilm_demo.yaml"), {})
    assert cfg.epochs == 2


def test_images_put_the_examples_where_the_step_looks_and_run_as_uid_1000() -> None:
    from pipelines.lora_finetune import IMAGE_UID
    from vembed.config import TrainerOptions

    for dockerfile in ("Dockerfile.cpu", "Dockerfile.cuda"):
        text = (ROOT / "images" / dockerfile).read_text()
        assert f"WORKDIR {IMAGE_HOME}" in text and "COPY examples examples" in text, dockerfile
        (user,) = re.findall(r"^USER (\S+)", text, flags=re.M)
        assert user.split(":")[0] == str(IMAGE_UID), f"{dockerfile}: pods run as {IMAGE_UID}"
    assert TrainerOptions().run_as_user == IMAGE_UID


def test_pipeline_options_from_env_for_cluster_settings() -> None:
    from pipelines.lora_finetune import PipelineOptions

    opts = PipelineOptions.from_env({"VEMBED_EVALUATE_GPUS": "1", "VEMBED_IMAGE_PULL_SECRETS": "regcred, mirror"})
    assert opts.evaluate_accelerator_limit == 1 and opts.image_pull_secrets == ["regcred", "mirror"]
    digest = "ghcr.io/vembed-factory/vembed@sha256:" + "0" * 64
    assert PipelineOptions(image=digest).image == digest
    with pytest.raises(ConfigError, match="not an image reference"):
        PipelineOptions(train_image="ghcr.io/x/y@sha256:abc")


def test_older_backend_knobs_drop_the_exit_handler_and_security_context(tmp_path: Path) -> None:
    import yaml

    from pipelines.cli import main

    out = tmp_path / "old.yaml"
    assert main(["compile", "--output", str(out), "--no-exit-handler", "--no-security-context"]) == 0
    text = out.read_text()
    assert "on-exit" not in text and "securityContext" not in text and "taskFinalStatus" not in text
    spec, _ = yaml.safe_load_all(text)
    assert {"registration", "metrics_report"} <= set(spec["root"]["outputDefinitions"]["parameters"]) | set(
        spec["root"]["outputDefinitions"]["artifacts"]
    )
