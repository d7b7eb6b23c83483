from pathlib import Path

import pytest
import yaml

from vembed.cli import main
from vembed.config import TrainConfig, load_config
from vembed.errors import ConfigError

EXAMPLES = sorted((Path(__file__).parents[2] / "examples").glob("*.yaml"))


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


def test_precedence_defaults_yaml_overrides(tmp_path):
    p = write(tmp_path, "lora_r: 8\nbatch_size: 4\n")
    cfg = load_config(p, ["lora_r=32"])
    assert cfg.lora_r == 32  # override beats YAML
    assert cfg.batch_size == 4  # YAML beats default
    assert cfg.lora_alpha == TrainConfig().lora_alpha  # default


@pytest.mark.parametrize(
    ("pair", "key", "expected"),
    [
        ("lora_r=32", "lora_r", 32),
        ("learning_rate=1e-4", "learning_rate", 1e-4),
        ("lora_dropout=0.1", "lora_dropout", 0.1),
        ("use_mrl=true", "use_mrl", True),
        ("use_lora=False", "use_lora", False),
        ("mrl_dims=[1024,512]", "mrl_dims", [1024, 512]),
        ("mrl_dims=1024,512", "mrl_dims", [1024, 512]),
        ("lora_target_modules=query,value", "lora_target_modules", ["query", "value"]),
        ("lora_target_modules=[q_proj, v_proj]", "lora_target_modules", ["q_proj", "v_proj"]),
        ("modules_to_save=null", "modules_to_save", None),
        ("torch_dtype=bf16", "torch_dtype", "bfloat16"),
    ],
)
def test_override_coercion(pair, key, expected):
    value = getattr(load_config(None, [pair]), key)
    assert value == expected
    assert type(value) is type(expected)


def test_yaml_scientific_notation_is_float(tmp_path):
    # PyYAML reads `1e-4` as a string; the config must still give a float.
    cfg = load_config(write(tmp_path, "learning_rate: 1e-4\n"))
    assert cfg.learning_rate == pytest.approx(1e-4)


def test_unknown_key_in_yaml_suggests(tmp_path):
    p = write(tmp_path, "lora_rank: 8\n")
    with pytest.raises(ConfigError, match=r"c\.yaml: unknown config key 'lora_rank'; did you mean lora_r\?"):
        load_config(p)


def test_unknown_key_in_override_suggests():
    with pytest.raises(ConfigError, match=r"unknown config key 'lora_rank'; did you mean lora_r\?"):
        load_config(None, ["lora_rank=8"])


def test_override_without_equals():
    with pytest.raises(ConfigError, match="expected key=value"):
        load_config(None, ["lora_r"])


@pytest.mark.parametrize(
    ("pair", "key"),
    [
        ("lora_r=0", "lora_r"),
        ("lora_r=-4", "lora_r"),
        ("lora_dropout=1.0", "lora_dropout"),
        ("lora_dropout=-0.1", "lora_dropout"),
        ("learning_rate=0", "learning_rate"),
        ("learning_rate=-1e-4", "learning_rate"),
        ("torch_dtype=float8", "torch_dtype"),
        ("lora_target_modules=[]", "lora_target_modules"),
        ("mrl_dims=[256,512]", "mrl_dims"),
        ("mrl_dims=[512,512]", "mrl_dims"),
        ("batch_size=zero", "batch_size"),
    ],
)
def test_invalid_values_name_the_key(pair, key):
    with pytest.raises(ConfigError, match=rf"\b{key}\b"):
        load_config(None, [pair])


def test_mrl_weights_length_must_match():
    with pytest.raises(ConfigError, match=r"mrl_weights: has 1 weights but mrl_dims has 2"):
        load_config(None, ["mrl_dims=[512,256]", "mrl_weights=[1.0]"])


def test_invalid_yaml_names_line(tmp_path):
    p = write(tmp_path, "lora_r: 8\nlora_alpha: [1,\n")
    with pytest.raises(ConfigError, match=r"c\.yaml:\d+: invalid YAML"):
        load_config(p)


def test_missing_file():
    with pytest.raises(ConfigError, match="nope.yaml: config file not found"):
        load_config("nope.yaml")


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_examples_load(path):
    raw = yaml.safe_load(path.read_text())
    cfg = load_config(path)
    for key, value in raw.items():
        got = getattr(cfg, key)
        if isinstance(value, str) and isinstance(got, float):
            value = float(value)  # YAML reads 1e-4 as text
        assert got == value, key


def test_guide_examples_present():
    names = {p.stem for p in EXAMPLES}
    for expected in (
        "quick_start",
        "complete_lora",
        "quick_experiment",
        "production",
        "qwen3_8b_fsdp",
        "lora_gradcache",
        "lora_mrl",
        "fsdp_gradcache",
    ):
        assert expected in names


def test_config_show_cli(capsys):
    rc = main(["config", "show", "examples/quick_start.yaml", "--config_override", "lora_r=32", "lora_alpha=64"])
    out = capsys.readouterr().out
    assert rc == 0
    data = yaml.safe_load(out)
    assert data["lora_r"] == 32 and isinstance(data["lora_r"], int)
    assert "lora_r: 32\n" in out


def test_config_show_cli_unknown_key(capsys):
    rc = main(["config", "show", "examples/quick_start.yaml", "--config_override", "lora_rank=8"])
    err = capsys.readouterr().err
    assert rc != 0
    assert "did you mean lora_r?" in err
    assert "Traceback" not in err


def test_saved_config_round_trips(tmp_path):
    cfg = load_config(None, ["lora_r=4", "mrl_dims=[64,32]", "use_mrl=true"])
    cfg.save(tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == cfg


def test_readme_documents_every_config_key():
    from vembed.config import TrainerOptions

    readme = (Path(__file__).parents[2] / "README.md").read_text()
    keys = [k for k in TrainConfig.model_fields if k != "trainer"]
    keys += [f"trainer.{k}" for k in TrainerOptions.model_fields]
    missing = [k for k in keys if f"`{k}`" not in readme]
    assert not missing, f"README config reference lacks {missing}"
