import json
import shutil
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModel

from vembed.artifacts.integrity import write_manifest
from vembed.config import load_config
from vembed.errors import CheckpointError, ConfigError
from vembed.training import train
from vembed.training.loop import build_accelerator


def cfg_for(model, data, out, **kw):
    base = {
        "model_name": model,
        "data_path": data,
        "output_dir": str(out),
        "batch_size": 8,
        "learning_rate": 1e-3,
        "logging_steps": 2,
        "save_steps": 3,
        "save_total_limit": 2,
        "max_seq_length": 32,
    }
    return load_config(None, {**base, **kw})


def test_training_writes_checkpoints_log_and_config(tiny_bert, pairs_file, tmp_path):
    out = tmp_path / "out"
    cfg = cfg_for(tiny_bert, pairs_file, out, epochs=2)
    result = train(cfg)
    assert result.global_step == 12  # 48 pairs / 8 per batch * 2 epochs
    assert result.checkpoint_dir == out / "checkpoint-12"
    # save_total_limit=2 keeps the newest two; nothing temporary is left behind
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-12", "checkpoint-9", "config.yaml", "training_log.txt"]
    ckpt = result.checkpoint_dir
    for name in ("adapter_config.json", "adapter_model.safetensors", "vembed_config.yaml", "trainer_state.json"):
        assert (ckpt / name).is_file(), name
    assert not list(ckpt.glob("*.bin"))
    lines = (out / "training_log.txt").read_text().splitlines()
    steps = [ln for ln in lines if ln.startswith("step=")]
    assert len(steps) == 6
    assert all(k in steps[0] for k in ("epoch=", "loss=", "lr=", "samples/s="))
    assert load_config(out / "config.yaml").model_dump() == cfg.model_dump()  # the resolved config, all of it
    # the guide's loading recipe works on our checkpoints
    model = PeftModel.from_pretrained(AutoModel.from_pretrained(tiny_bert), str(ckpt))
    assert any("lora_A" in n for n, _ in model.named_parameters())


def test_a_new_run_never_replaces_another_runs_checkpoints(tiny_bert, pairs_file, tmp_path):
    from vembed.artifacts.integrity import build_manifest

    out = tmp_path / "out"
    train(cfg_for(tiny_bert, pairs_file, out, epochs=2))
    before = {p.name: build_manifest(p) if p.is_dir() else p.read_bytes() for p in out.iterdir()}
    with pytest.raises(ConfigError, match=r"checkpoint-9 belongs to another run \(learning_rate was 0.001 there"):
        train(cfg_for(tiny_bert, pairs_file, out, epochs=1, learning_rate=5e-3))
    assert {p.name: build_manifest(p) if p.is_dir() else p.read_bytes() for p in out.iterdir()} == before
    # The same config again (a rerun, a restarted job pod) may replace its own checkpoints.
    assert train(cfg_for(tiny_bert, pairs_file, out, epochs=2)).checkpoint_dir == out / "checkpoint-12"


def test_resume_into_another_runs_output_dir_is_refused(tiny_bert, pairs_file, tmp_path):
    # Resuming run B's checkpoint with output_dir = run A's directory would rotate A's checkpoints away.
    a, b = tmp_path / "a", tmp_path / "b"
    train(cfg_for(tiny_bert, pairs_file, a, max_steps=3, save_steps=1))
    train(cfg_for(tiny_bert, pairs_file, b, max_steps=2, learning_rate=2e-3))
    before = sorted(p.name for p in a.iterdir())
    with pytest.raises(ConfigError, match=r"a/checkpoint-2 belongs to another run \(learning_rate was 0.001 there"):
        train(cfg_for(tiny_bert, pairs_file, a, max_steps=3, learning_rate=2e-3, save_total_limit=1,
                      resume_from_checkpoint=str(b / "checkpoint-2")))  # fmt: skip
    assert sorted(p.name for p in a.iterdir()) == before


def test_loss_decreases(tiny_bert, tmp_path):
    from tests.conftest import write_pairs

    data = write_pairs(tmp_path / "d.jsonl", n=16, negatives=False)
    result = train(cfg_for(tiny_bert, data, tmp_path / "o", epochs=15, logging_steps=2, learning_rate=3e-3))
    first, last = result.history[0]["loss"], result.history[-1]["loss"]
    assert last < first * 0.8, (first, last)


def test_qwen3_last_token_training(tiny_qwen3, pairs_file, tmp_path):
    result = train(cfg_for(tiny_qwen3, pairs_file, tmp_path / "o", max_steps=2))
    cfg = json.loads((result.checkpoint_dir / "adapter_config.json").read_text())
    assert set(cfg["target_modules"]) == {"q_proj", "v_proj"}
    assert json.loads((result.checkpoint_dir / "embedder.json").read_text())["pooling"] == "last_token"


def test_full_finetune_checkpoint_is_a_model(tiny_bert, pairs_file, tmp_path):
    result = train(cfg_for(tiny_bert, pairs_file, tmp_path / "o", use_lora=False, max_steps=2))
    assert (result.checkpoint_dir / "model.safetensors").is_file()
    AutoModel.from_pretrained(str(result.checkpoint_dir))


def test_mrl_and_hard_negatives_train(tiny_bert, tmp_path, monkeypatch):
    """In training, the loss has one term per MRL dim, each with the rows' hard negatives in its candidate
    pool, and every dim's term falls as training goes on."""
    import vembed.training.loop as loop
    from tests.conftest import write_pairs

    dims, steps = [32, 16, 8], 8
    seen: list[dict] = []
    real_build_loss = loop.build_loss

    class Spy(torch.nn.Module):
        """The real training loss, recording what the loop hands it (nothing is replaced)."""

        def __init__(self, real: torch.nn.Module) -> None:
            super().__init__()
            self.real = real

        def forward(self, q, p, n=None, labels=None, mask=None):
            loss = self.real(q, p, n, labels, mask)
            seen.append({k: None if v is None else v.detach().clone() for k, v in
                         {"q": q, "p": p, "n": n, "labels": labels, "mask": mask, "loss": loss}.items()})  # fmt: skip
            return loss

    monkeypatch.setattr(loop, "build_loss", lambda cfg, dim: Spy(real_build_loss(cfg, dim)))
    # One batch holds the whole data set, so every step sees the same pairs and the terms are comparable.
    data = write_pairs(tmp_path / "d.jsonl", n=16, negatives=True)
    cfg = cfg_for(tiny_bert, data, tmp_path / "o", use_mrl=True, mrl_dims=dims, mrl_weights=[1.0, 1.0, 1.0],
                  batch_size=16, epochs=steps, learning_rate=1e-2, lora_dropout=0.0)  # fmt: skip
    result = train(cfg)
    assert result.global_step == steps and len(seen) == steps

    # The loss one dim would get on its own (same settings, no MRL): the reference for each MRL term.
    single = real_build_loss(cfg.model_copy(update={"use_mrl": False}), 32)
    terms = []
    for call in seen:
        q, p, n, mask = call["q"], call["p"], call["n"], call["mask"]
        assert n is not None and n.shape == (16, 32), "each row's hard negative reaches the loss, at full dim"
        per_dim = [single(q[:, :d], p[:, :d], n[:, :d], call["labels"], mask) for d in dims]
        torch.testing.assert_close(call["loss"], sum(per_dim) / len(dims))
        # The false-negative mask covers the hard-negative columns too: keep only the in-batch part.
        in_batch = None if mask is None else mask[:, : p.size(0)]
        without_negatives = sum(single(q[:, :d], p[:, :d], None, call["labels"], in_batch) for d in dims) / len(dims)
        assert (call["loss"] - without_negatives).abs() > 1e-3, "the negatives change the loss"
        terms.append([t.item() for t in per_dim])
    for i, d in enumerate(dims):
        first, last = terms[0][i], terms[-1][i]
        assert last < 0.9 * first, f"the dim-{d} term did not fall: {first:.4f} -> {last:.4f}"


def test_mrl_dim_larger_than_model_is_config_error(tiny_bert, pairs_file, tmp_path):
    with pytest.raises(ConfigError, match=r"mrl_dims: \[64\] exceed"):
        train(cfg_for(tiny_bert, pairs_file, tmp_path / "o", use_mrl=True, mrl_dims=[64, 16], max_steps=1))
    assert not (tmp_path / "o").exists()  # refused before the run writes its output_dir


def test_refused_mrl_dims_on_resume_keeps_the_runs_config(tiny_bert, pairs_file, tmp_path):
    # mrl_dims is checked against the loaded model; a resume that fails it must not rewrite config.yaml.
    out = tmp_path / "o"
    train(cfg_for(tiny_bert, pairs_file, out, max_steps=1))
    before = (out / "config.yaml").read_text()
    with pytest.raises(ConfigError, match=r"mrl_dims: \[64\] exceed"):
        train(cfg_for(tiny_bert, pairs_file, out, max_steps=2, use_mrl=True, mrl_dims=[64, 16], resume_from_checkpoint="latest"))
    assert (out / "config.yaml").read_text() == before


@pytest.mark.parametrize(("dtype", "expected"), [("float32", "no"), ("bfloat16", "bf16"), ("auto", "no")])
def test_precision_requested_is_applied(tiny_bert, dtype, expected):
    # On this CPU-only machine, auto means fp32; bf16 must reach the accelerator.
    cfg = load_config(None, {"model_name": tiny_bert, "torch_dtype": dtype})
    accelerator, torch_dtype = build_accelerator(cfg)
    assert accelerator.mixed_precision == expected
    from vembed.models import Item
    from vembed.training.loop import build_embedder

    emb = accelerator.prepare(build_embedder(cfg, torch_dtype))
    inner = accelerator.unwrap_model(emb)
    batch = inner.collate([inner.featurize(Item(text="hello world"), False)])
    seen = []
    linear = inner.backbone.get_base_model().encoder.layer[0].attention.self.query.base_layer
    linear.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    emb(**batch)
    # matmuls run in the requested precision (accelerate casts the final output back to fp32)
    assert seen == [torch.bfloat16 if expected == "bf16" else torch.float32]
    if expected == "bf16":
        # frozen base weights are loaded in bf16, trainable LoRA weights stay fp32
        assert inner.backbone.get_base_model().embeddings.word_embeddings.weight.dtype == torch.bfloat16
        assert {p.dtype for p in inner.parameters() if p.requires_grad} == {torch.float32}


def test_fp16_on_cpu_is_refused(tiny_bert):
    if torch.cuda.is_available():
        pytest.skip("CUDA present")
    with pytest.raises(ConfigError, match="float16 needs a CUDA device"):
        build_accelerator(load_config(None, {"model_name": tiny_bert, "torch_dtype": "float16"}))


def test_corrupt_checkpoint_is_not_resumed(tiny_bert, pairs_file, tmp_path):
    out = tmp_path / "o"
    result = train(cfg_for(tiny_bert, pairs_file, out, max_steps=3))
    weights = result.checkpoint_dir / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10])  # truncated by a crash or a bad copy
    with pytest.raises(CheckpointError, match=r"adapter_model.safetensors: size \d+ does not match manifest"):
        train(cfg_for(tiny_bert, pairs_file, out, max_steps=6, resume_from_checkpoint="latest"))


def test_checkpoint_with_legacy_checksums_is_verified_and_resumes(tiny_bert, pairs_file, tmp_path):
    """Checkpoints of earlier vembed versions carry checksums.json ({file: sha256}) instead of the
    manifest: still verified on read, so they resume, and a damaged one is refused."""
    out = tmp_path / "o"
    ckpt = train(cfg_for(tiny_bert, pairs_file, out, max_steps=2)).checkpoint_dir
    manifest = json.loads((ckpt / "manifest.json").read_text())
    (ckpt / "checksums.json").write_text(json.dumps({e["path"]: e["sha256"] for e in manifest["files"]}))
    (ckpt / "manifest.json").unlink()
    assert train(cfg_for(tiny_bert, pairs_file, out, max_steps=3, resume_from_checkpoint=str(ckpt))).global_step == 3
    scheduler = ckpt / "scheduler.json"
    scheduler.write_text(scheduler.read_text() + " ")
    with pytest.raises(CheckpointError, match="scheduler.json: sha256 does not match manifest"):
        train(cfg_for(tiny_bert, pairs_file, out, max_steps=4, resume_from_checkpoint=str(ckpt)))


def test_partial_checkpoint_is_detected(tiny_bert, pairs_file, tmp_path):
    out = tmp_path / "o"
    result = train(cfg_for(tiny_bert, pairs_file, out, max_steps=3))
    (result.checkpoint_dir / "manifest.json").unlink()
    with pytest.raises(CheckpointError, match="incomplete checkpoint"):
        train(cfg_for(tiny_bert, pairs_file, out, max_steps=6, resume_from_checkpoint=str(result.checkpoint_dir)))


def test_pickle_checkpoint_refused(tiny_bert, pairs_file, tmp_path):
    from vembed.inference.predictor import Predictor

    out = tmp_path / "o"
    result = train(cfg_for(tiny_bert, pairs_file, out, max_steps=1))
    torch.save({"x": torch.zeros(1)}, result.checkpoint_dir / "adapter_model.bin")
    with pytest.raises(CheckpointError, match="refusing pickle"):
        Predictor(str(result.checkpoint_dir))


def test_resume_in_process_matches_uninterrupted(tiny_bert, pairs_file, tmp_path):
    from tests.support.resume_log import assert_resumed

    # Crosses an epoch boundary (6 batches per epoch) with dropout on.
    opts = {"epochs": 2, "max_steps": 8, "save_steps": 4, "lora_dropout": 0.1, "logging_steps": 1}
    full = train(cfg_for(tiny_bert, pairs_file, tmp_path / "a", **opts))
    # Start "b" from a's mid-run checkpoint, as if a had been interrupted right after it.
    shutil.copytree(tmp_path / "a" / "checkpoint-4", tmp_path / "b" / "checkpoint-4")
    resumed = train(cfg_for(tiny_bert, pairs_file, tmp_path / "b", resume_from_checkpoint="latest", **opts))
    # A restart from step 0 would reach the same weights (seeded); the log shows that it resumed.
    assert assert_resumed(tmp_path / "b" / "training_log.txt", checkpoint=4) == (4, [5, 6, 7, 8])
    assert [h["step"] for h in resumed.history] == list(range(1, 9))  # steps 1-4 came from the checkpoint
    a = load_file(str(full.checkpoint_dir / "adapter_model.safetensors"))
    b = load_file(str(resumed.checkpoint_dir / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)


def test_resume_with_different_settings_is_refused(tiny_bert, pairs_file, tmp_path):
    out = tmp_path / "o"
    train(cfg_for(tiny_bert, pairs_file, out, max_steps=2))
    with pytest.raises(CheckpointError, match="batch_size was 8 there but is 4 now"):
        train(cfg_for(tiny_bert, pairs_file, out, max_steps=4, batch_size=4, resume_from_checkpoint="latest"))


def test_resume_with_other_trainable_parameters_is_refused_before_writing(tiny_bert, pairs_file, tmp_path):
    # These change the adapter's tensors or the optimizer's groups: loading the checkpoint crashed
    # (RuntimeError, KeyError, ValueError) after config.yaml had been rewritten with the new settings.
    out = tmp_path / "o"
    train(cfg_for(tiny_bert, pairs_file, out, max_steps=1))
    before = (out / "config.yaml").read_text()
    changes = {"use_dora": True, "modules_to_save": ["encoder.layer.1.output"], "loraplus_lr_ratio": 16.0}
    for key, value in changes.items():
        with pytest.raises(CheckpointError, match=rf"cannot resume, {key} was .* there but is .* now"):
            train(cfg_for(tiny_bert, pairs_file, out, max_steps=2, resume_from_checkpoint="latest", **{key: value}))
        assert (out / "config.yaml").read_text() == before
    # A checkpoint of an earlier version, written before these keys existed, had their defaults: it resumes.
    saved = out / "checkpoint-1" / "vembed_config.yaml"
    saved.write_text("".join(ln for ln in saved.read_text().splitlines(True) if not ln.startswith(tuple(changes))))
    write_manifest(saved.parent)
    assert train(cfg_for(tiny_bert, pairs_file, out, max_steps=2, resume_from_checkpoint="latest")).global_step == 2


def test_bad_data_names_line_before_training(tiny_bert, tmp_path):
    from vembed.errors import DataError

    data = tmp_path / "d.jsonl"
    data.write_text('{"query": "a", "positive": "b"}\n{"query": "a"}\n')
    with pytest.raises(DataError, match=rf"{data}:2: missing field 'positive'"):
        train(cfg_for(tiny_bert, str(data), tmp_path / "o"))
    assert not Path(tmp_path / "o" / "checkpoint-1").exists()


def test_max_seq_length_above_the_models_positions_is_refused_before_training(tiny_bert, tmp_path):
    # tiny_bert has 256 positions: a 400-token text crashed the forward pass mid-run (a tensor-size traceback).
    data = tmp_path / "d.jsonl"
    data.write_text("".join('{"query": "%s", "positive": "b"}\n' % ("a " * (400 if i == 9 else 2)) for i in range(16)))
    with pytest.raises(ConfigError, match=r"^max_seq_length: 512 exceeds the 256 positions of model .*max_position_embeddings"):
        train(cfg_for(tiny_bert, str(data), tmp_path / "o", max_seq_length=512))
    assert not (tmp_path / "o").exists()


def test_identical_rows_train_without_false_negatives(tiny_bert, tmp_path, caplog):
    """16 copies of one pair: every other row is the same document, so nothing is a negative."""
    data = tmp_path / "dup.jsonl"
    data.write_text((json.dumps({"query": "how do I open a file", "positive": "open(path) opens a file"}) + "\n") * 16)
    with caplog.at_level("WARNING"):
        result = train(cfg_for(tiny_bert, str(data), tmp_path / "o", batch_size=16, logging_steps=1))
    assert result.history[0]["masked_negatives"] == 16 * 15
    assert result.final_loss == 0.0  # each query's softmax holds only its own positive
    assert "one positive for all of them" in caplog.text
    assert "masked_negatives=240" in (tmp_path / "o" / "training_log.txt").read_text()
    # with the mask off, the copies are scored as negatives of each other
    off = train(cfg_for(tiny_bert, str(data), tmp_path / "off", batch_size=16, mask_false_negatives=False))
    assert off.history[0]["masked_negatives"] == 0
    assert off.final_loss > 1.0
