import numpy as np
import pytest
from sentence_transformers import SentenceTransformer
from transformers import AutoModel

from tests.training.test_training import cfg_for
from vembed.errors import VembedError
from vembed.inference.export import merge_adapter
from vembed.inference.predictor import Predictor
from vembed.training import train

TEXTS = ["alpha beta gamma", "a much longer text about theta iota kappa with several more words", "x"]


@pytest.fixture(scope="module")
def trained(tiny_bert, tmp_path_factory):
    from tests.conftest import write_pairs

    tmp = tmp_path_factory.mktemp("trained")
    data = write_pairs(tmp / "d.jsonl")
    # A query instruction exercises the prompt path through export too.
    return train(cfg_for(tiny_bert, data, tmp / "out", max_steps=4, learning_rate=5e-3, query_instruction="q: "))


def test_adapter_merged_and_sentence_transformers_agree(trained, tmp_path):
    merged = merge_adapter(trained.checkpoint_dir, tmp_path / "merged")
    adapter = Predictor(str(trained.checkpoint_dir)).encode_text(TEXTS)
    from_merged = Predictor(str(merged)).encode_text(TEXTS)
    st = SentenceTransformer(str(merged), device="cpu").encode(TEXTS)
    assert adapter.dtype == np.float32 and adapter.shape == (3, 32)
    assert np.abs(adapter - from_merged).max() <= 1e-5
    assert np.abs(adapter - st).max() <= 1e-5
    # queries get the instruction through ST's prompt, as through the Predictor
    q_adapter = Predictor(str(trained.checkpoint_dir)).encode_text(TEXTS, is_query=True)
    q_st = SentenceTransformer(str(merged), device="cpu").encode(TEXTS, prompt_name="query")
    assert np.abs(q_adapter - q_st).max() <= 1e-5
    assert np.abs(q_adapter - adapter).max() > 1e-3
    AutoModel.from_pretrained(str(merged))  # a plain transformers load works too
    assert not list(merged.glob("*.bin"))


def test_training_changed_the_embeddings(trained, tiny_bert):
    tuned = Predictor(str(trained.checkpoint_dir)).encode_text(TEXTS)
    base = Predictor(tiny_bert).encode_text(TEXTS)
    assert np.abs(tuned - base).max() > 1e-4


def test_outputs_are_normalised_and_mrl_truncation_renormalises(trained):
    p = Predictor(str(trained.checkpoint_dir))
    full = p.encode_text(TEXTS)
    np.testing.assert_allclose(np.linalg.norm(full, axis=1), 1.0, rtol=1e-5)
    small = p.encode_text(TEXTS, dim=8)
    assert small.shape == (3, 8)
    np.testing.assert_allclose(np.linalg.norm(small, axis=1), 1.0, rtol=1e-5)
    expected = full[:, :8] / np.linalg.norm(full[:, :8], axis=1, keepdims=True)
    np.testing.assert_allclose(small, expected, atol=1e-6)
    assert p.encode_text("one").shape == (1, 32)
    with pytest.raises(VembedError, match="dim=64"):
        p.encode_text("one", dim=64)


def test_sentence_transformers_dir_matches_encode(minilm_path):
    texts = ["How do I sort a list in Python?", "sorted() returns a new list", "Paris"]
    ours = Predictor(minilm_path).encode_text(texts)
    theirs = SentenceTransformer(minilm_path, device="cpu").encode(texts)
    assert np.abs(ours - theirs).max() <= 1e-5


def test_hub_id_resolves_to_packaged_minilm():
    p = Predictor("sentence-transformers/all-MiniLM-L6-v2")
    assert p.dim == 384 and p.spec.pooling == "mean"


def test_merge_rejects_non_checkpoint(tmp_path):
    from vembed.errors import CheckpointError

    with pytest.raises(CheckpointError, match="not an adapter checkpoint"):
        merge_adapter(tmp_path, tmp_path / "m")


def test_cli_encode_and_merge(trained, tmp_path, capsys):
    from vembed.cli import main

    assert main(["merge", str(trained.checkpoint_dir), str(tmp_path / "m")]) == 0
    assert main(["encode", str(tmp_path / "m"), "--text", "hello", "--output", str(tmp_path / "e.npy")]) == 0
    assert np.load(tmp_path / "e.npy").shape == (1, 32)
    # An existing output is replaced only when asked, and whole (no temporary file is left).
    assert main(["encode", str(tmp_path / "m"), "--text", "a", "b", "--output", str(tmp_path / "e.npy")]) == 2
    assert np.load(tmp_path / "e.npy").shape == (1, 32)
    assert main(["encode", str(tmp_path / "m"), "--text", "a", "b", "--output", str(tmp_path / "e"), "--overwrite"]) == 0
    assert np.load(tmp_path / "e.npy").shape == (2, 32)
    assert sorted(p.name for p in tmp_path.glob("*.npy*")) == ["e.npy"]


@pytest.mark.parametrize(
    "content, reason",
    [
        ("not json", "Expecting value"),
        ('{"family": "text", "model_name": "m"}', "'pooling' and 'max_seq_length'"),
        ('{"family": "nope", "model_name": "m", "pooling": "mean", "max_seq_length": 64}', "family 'nope'"),
        ('{"family": "text", "model_name": "m", "pooling": "weird", "max_seq_length": 64}', "pooling 'weird'"),
        ('{"family": "text", "model_name": "m", "pooling": "projection", "max_seq_length": 64}', "for text"),
    ],
)
def test_a_bad_embedder_json_is_one_line_naming_it(tiny_bert, tmp_path, content, reason):
    import shutil

    d = tmp_path / "model"
    shutil.copytree(tiny_bert, d)
    (d / "embedder.json").write_text(content)  # hand-written next to a model (no manifest guards it)
    with pytest.raises(VembedError, match=r"embedder\.json: ") as e:
        Predictor(str(d))
    assert reason in str(e.value) and "\n" not in str(e.value)


def test_the_poolings_text_families_accept_are_the_ones_pooling_implements():
    from vembed.models.base import Embedder
    from vembed.models.pooling import ST_POOLING

    assert set(Embedder.poolings) == set(ST_POOLING)


@pytest.mark.parametrize("with_spec", [False, True])
def test_an_adapter_whose_base_model_is_gone_names_the_adapter(tmp_path, with_spec):
    import json

    d = tmp_path / "adapter"
    d.mkdir()
    (d / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "/gone/base", "peft_type": "LORA"}))
    if with_spec:
        spec = {"family": "text", "model_name": "/gone/base", "pooling": "mean", "max_seq_length": 64}
        (d / "embedder.json").write_text(json.dumps(spec))
    with pytest.raises(VembedError) as e:
        Predictor(str(d))
    assert str(e.value).startswith(f"{d}: cannot load the adapter's base model (") and "/gone/base" in str(e.value)


def test_merge_never_replaces_the_base_model_of_its_own_checkpoint(trained, tmp_path):
    # A merged model trained further, then merged back over itself with --overwrite: the base the
    # adapter was trained on was replaced, leaving the adapter on top of already-merged weights.
    from tests.conftest import write_pairs
    from vembed.errors import StorageError

    base = merge_adapter(trained.checkpoint_dir, tmp_path / "m1")
    before = {p.name: p.read_bytes() for p in base.iterdir() if p.is_file()}
    again = train(cfg_for(str(base), write_pairs(tmp_path / "d.jsonl", n=8), tmp_path / "run", max_steps=1))
    with pytest.raises(StorageError, match=r"m1: is the base model of .*checkpoint-1; replacing it"):
        merge_adapter(again.checkpoint_dir, base, overwrite=True)
    assert {p.name: p.read_bytes() for p in base.iterdir() if p.is_file()} == before


def test_merge_of_a_training_run_names_its_newest_checkpoint(trained, tmp_path):
    run = trained.checkpoint_dir.parent  # holds checkpoint-3 and checkpoint-4: the newest is named
    with pytest.raises(VembedError, match=rf"^{run}: is a training run; give one of its checkpoints, e.g. {run}/checkpoint-4$"):
        merge_adapter(run, tmp_path / "m")
