"""The MRL rotation: checked against numpy's SVD, and carried through training, Predictor and merge."""

import numpy as np
import pytest
import torch
from sentence_transformers import SentenceTransformer

from tests.training.test_training import cfg_for
from vembed.artifacts.integrity import check_integrity
from vembed.inference.export import merge_adapter
from vembed.inference.predictor import Predictor
from vembed.models.rotation import ROTATION_FILE, fit_rotation, load_rotation
from vembed.training import train

TEXTS = ["alpha beta gamma", "a much longer text about theta iota kappa with several more words", "x", "delta"]


def test_fit_rotation_matches_the_svd_of_the_normalised_rows():
    gen = torch.Generator().manual_seed(0)
    # Anisotropic data, so that the principal axes are well separated.
    x = torch.randn(200, 12, generator=gen, dtype=torch.float64) * torch.linspace(3.0, 0.2, 12, dtype=torch.float64)
    x = x @ torch.linalg.qr(torch.randn(12, 12, generator=gen, dtype=torch.float64))[0]
    rot = fit_rotation(x.float()).double()
    np.testing.assert_allclose((rot.T @ rot).numpy(), np.eye(12), atol=1e-5)  # orthogonal
    unit = (x / x.norm(dim=1, keepdim=True)).numpy()
    _, s, vt = np.linalg.svd(unit, full_matrices=False)
    # Each axis is the reference's singular vector, in the same order, up to sign.
    np.testing.assert_allclose(np.abs(rot.numpy().T @ vt.T), np.eye(12), atol=1e-4)
    # The first k rotated dims hold as much of the rows' energy as any k dims can.
    rotated = unit @ rot.numpy()
    for k in (1, 3, 6):
        np.testing.assert_allclose((rotated[:, :k] ** 2).sum(), (s[:k] ** 2).sum(), rtol=1e-6)
    # Deterministic, whatever sign the eigensolver picks: the largest component of each axis is positive.
    largest = rot.gather(0, rot.abs().argmax(0, keepdim=True))
    assert (largest > 0).all()
    assert torch.equal(fit_rotation(x.float()), fit_rotation(x.float()))


@pytest.fixture(scope="module")
def mrl_run(tiny_bert, tmp_path_factory):
    from tests.conftest import write_pairs

    tmp = tmp_path_factory.mktemp("mrl")
    data = write_pairs(tmp / "d.jsonl")
    cfg = cfg_for(tiny_bert, data, tmp / "out", max_steps=4, learning_rate=5e-3, use_mrl=True, mrl_dims=[32, 8])
    return train(cfg)


def test_training_stores_the_rotation_and_predictor_applies_it(mrl_run):
    ckpt = mrl_run.checkpoint_dir
    check_integrity(ckpt)  # the rotation is in the checkpoint's manifest
    rot = load_rotation(ckpt)
    assert rot is not None and rot.shape == (32, 32)
    p = Predictor(str(ckpt))
    rotated = p.encode_text(TEXTS)
    p.embedder.rotation = None
    plain = p.encode_text(TEXTS)
    assert np.abs(rotated - plain).max() > 1e-3  # it does rotate
    np.testing.assert_allclose(rotated, plain @ rot.numpy(), atol=1e-5)
    # Full-dim similarities are the unrotated model's.
    np.testing.assert_allclose(rotated @ rotated.T, plain @ plain.T, atol=1e-5)
    p.embedder.rotation = rot
    small = p.encode_text(TEXTS, dim=8)
    np.testing.assert_allclose(small, rotated[:, :8] / np.linalg.norm(rotated[:, :8], axis=1, keepdims=True), atol=1e-5)


def test_each_checkpoint_has_its_own_rotation_and_fitting_leaves_resume_exact(mrl_run, tiny_bert, tmp_path):
    from safetensors.torch import load_file

    from tests.conftest import write_pairs

    mid, final = mrl_run.checkpoint_dir.parent / "checkpoint-3", mrl_run.checkpoint_dir
    assert not torch.equal(load_rotation(mid), load_rotation(final))
    # Resumed from step 3, the run ends with the same weights and rotation as the one that went through:
    # fitting a rotation at each save moves no random stream.
    data = write_pairs(tmp_path / "d.jsonl")
    cfg = cfg_for(tiny_bert, data, tmp_path / "out", max_steps=4, learning_rate=5e-3, use_mrl=True, mrl_dims=[32, 8],
                  resume_from_checkpoint=str(mid))  # fmt: skip
    resumed = train(cfg).checkpoint_dir
    a, b = (load_file(str(d / "adapter_model.safetensors")) for d in (final, resumed))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(load_rotation(final), load_rotation(resumed))


def test_merged_model_keeps_the_rotation_for_predictor_and_sentence_transformers(mrl_run, tmp_path):
    merged = merge_adapter(mrl_run.checkpoint_dir, tmp_path / "merged")
    assert (merged / ROTATION_FILE).is_file()
    adapter = Predictor(str(mrl_run.checkpoint_dir)).encode_text(TEXTS)
    np.testing.assert_allclose(Predictor(str(merged)).encode_text(TEXTS), adapter, atol=1e-5)
    st = SentenceTransformer(str(merged), device="cpu")
    np.testing.assert_allclose(st.encode(TEXTS), adapter, atol=1e-5)
    truncated = st.encode(TEXTS, truncate_dim=8, normalize_embeddings=True)
    np.testing.assert_allclose(truncated, Predictor(str(merged)).encode_text(TEXTS, dim=8), atol=1e-5)


def test_mrl_rotation_false_stores_none(tiny_bert, tmp_path):
    from tests.conftest import write_pairs

    data = write_pairs(tmp_path / "d.jsonl")
    cfg = cfg_for(tiny_bert, data, tmp_path / "out", max_steps=2, use_mrl=True, mrl_dims=[32, 8], mrl_rotation=False)
    assert not (train(cfg).checkpoint_dir / ROTATION_FILE).exists()


def test_registered_text_model_carries_the_rotation(mrl_run, tmp_path):
    """The MLflow model a registry version holds: its sentence_transformers flavor applies the rotation as
    a Dense layer, and Predictor reads it from that layer in the copy a download (vembed.artifacts.mlflow_store)
    returns, which has no rotation file."""
    import mlflow.pyfunc
    from mlflow.models import Model

    from vembed.artifacts.mlflow_model import build_model
    from vembed.artifacts.mlflow_store import ST_DATA_PATH

    merged = merge_adapter(mrl_run.checkpoint_dir, tmp_path / "merged")
    local = build_model(tmp_path, {"merged": str(merged)}, Model(), ["an example"])
    expected = Predictor(str(merged)).encode_text(TEXTS)
    served = mlflow.pyfunc.load_model(str(local)).predict(TEXTS)
    np.testing.assert_allclose(np.asarray(served), expected, atol=1e-5)
    assert not (local / ST_DATA_PATH / ROTATION_FILE).exists()
    np.testing.assert_allclose(Predictor(str(local / ST_DATA_PATH)).encode_text(TEXTS), expected, atol=1e-5)


def test_a_dense_layer_that_is_not_a_rotation_is_not_read_as_one(tmp_path):
    from sentence_transformers.base.modules import Dense

    for name, dense in {
        "tanh": Dense(4, 4, bias=False),  # sentence-transformers' default activation
        "bias": Dense(4, 4, bias=True, activation_function=None),
        "projection": Dense(4, 2, bias=False, activation_function=None),
        "rotation": Dense(4, 4, bias=False, activation_function=None, init_weight=torch.eye(4)[[1, 0, 3, 2]]),
    }.items():
        d = tmp_path / name
        (d / "2_Dense").mkdir(parents=True)
        dense.save(str(d / "2_Dense"))
        (d / "modules.json").write_text(f'[{{"idx": 2, "name": "2", "path": "2_Dense", "type": "{Dense.__module__}.Dense"}}]')
        rot = load_rotation(d)
        assert (rot is not None) == (name == "rotation"), name
    assert torch.equal(rot, torch.eye(4)[[1, 0, 3, 2]].T)
