"""CLIP family: projected dual-encoder embeddings, mixed batches, LoRA targets, and the
clip_tiny example trained on synthetic shapes, merged and encoded."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from tests.support import vl_flow
from tests.support.synthetic_images import write_image_caption_set
from vembed.cli import main as cli
from vembed.config import load_config
from vembed.errors import DataError
from vembed.inference.evaluation import build_retrieval_set, compare_models
from vembed.inference.predictor import Predictor
from vembed.models import Item, load_embedder
from vembed.models.lora import apply_lora
from vembed.training import train
from vembed.training.grad_cache import split_inputs

one_thread = pytest.fixture(autouse=True, scope="module")(vl_flow.one_thread)


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory) -> str:
    from tests.support.tiny_models import make_tiny_clip

    return str(make_tiny_clip(tmp_path_factory.mktemp("tiny") / "clip"))


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> dict:
    return write_image_caption_set(tmp_path_factory.mktemp("shapes"), per_caption=4, size=32, all_fields=True)


@pytest.fixture(scope="module")
def trained(tiny_clip, shapes, tmp_path_factory) -> vl_flow.TrainedFlow:
    # LoRA (the example's q_proj/v_proj/out_proj) on the random model; images decoded in a worker.
    return vl_flow.run_example(
        "clip_tiny.yaml", tiny_clip, shapes, tmp_path_factory.mktemp("clip_run"), "num_workers=1"
    )


def red_square() -> Image.Image:
    image = Image.new("RGB", (40, 30), (230, 230, 230))
    image.paste((220, 30, 30), (5, 5, 20, 20))
    return image


def test_clip_embeddings_are_the_projected_features(tiny_clip):
    emb = load_embedder(tiny_clip)
    assert (emb.family, emb.spec.pooling, emb.dim) == ("clip", "projection", emb.backbone.config.projection_dim)
    clip, proc = emb.backbone, emb.processor
    with torch.no_grad():
        text = clip.get_text_features(**proc.tokenizer(["a red square"], return_tensors="pt")).pooler_output
        image = clip.get_image_features(**proc.image_processor(red_square(), return_tensors="pt")).pooler_output
    ours = emb.embed_items([Item(text="a red square"), Item(image=red_square())])
    torch.testing.assert_close(ours, torch.cat([text, image]))


def test_clip_mixed_batch_scatters_back_and_slices_by_rows(tiny_clip):
    emb = load_embedder(tiny_clip)
    items = [Item(text="a red square"), Item(image=red_square()), Item(text="a longer text about a blue circle"),
             Item(image=red_square().rotate(90))]
    batch = emb.collate([emb.featurize(it, is_query=False) for it in items])
    assert all(v.shape[0] == len(items) for v in batch.values())  # row-aligned, so GradCache can chunk it
    with torch.no_grad():
        mixed = emb(**batch)
        single = torch.cat([emb(**emb.collate([emb.featurize(it, False)])) for it in items])
        chunked = torch.cat([emb(**chunk) for chunk in split_inputs(batch, 3)])
    torch.testing.assert_close(mixed, single, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(chunked, single, atol=1e-5, rtol=1e-5)


def test_clip_refuses_an_item_with_text_and_image(tiny_clip):
    emb = load_embedder(tiny_clip)
    with pytest.raises(DataError, match="retrieval_mode"):
        emb.featurize(Item(text="a red square", image=red_square()), is_query=True)


def test_clip_lora_guide_targets_cover_both_towers(tiny_clip):
    emb = load_embedder(tiny_clip)
    apply_lora(emb, load_config(None, {"model_name": tiny_clip, "lora_target_modules": ["q_proj", "v_proj", "out_proj"]}))
    adapted = {n.rsplit(".lora_A", 1)[0] for n, _ in emb.backbone.named_parameters() if "lora_A" in n}
    for tower in ("text_model", "vision_model"):
        for proj in ("q_proj", "v_proj", "out_proj"):
            assert any(tower in n and n.endswith(proj) for n in adapted), (tower, proj)
    assert not any(p.requires_grad for n, p in emb.backbone.named_parameters() if "lora_" not in n)


def test_clip_training_lowers_loss_and_beats_chance_on_held_out_pairs(trained):
    first, last = trained.history[0]["loss"], trained.history[-1]["loss"]
    assert last < 0.8 * first, (first, last)
    results = compare_models({"base": trained.base, "tuned": str(trained.checkpoint)}, trained.eval_path,
                             retrieval_mode="t2i")
    chance = 1 / 48  # one held-out image per caption
    tuned, base = results["tuned"]["full"]["recall@1"], results["base"]["full"]["recall@1"]
    assert tuned >= 4 * chance and tuned > base, (tuned, base)


def test_clip_merged_model_gives_the_adapter_embeddings(trained):
    vl_flow.assert_merged_matches_adapter(trained)
    from transformers import AutoModel

    assert type(AutoModel.from_pretrained(trained.merged)).__name__ == "CLIPModel"


def test_clip_predictor_encodes_paths_pil_images_and_truncates(trained):
    pred = Predictor(trained.merged, device="cpu")
    path = sorted((trained.data_dir / "images").glob("*.png"))[0]
    one = pred.encode_image(str(path))
    from_pil = pred.encode_image(Image.open(path), batch_size=1)
    assert one.shape == (1, pred.dim) and one.dtype == np.float32
    np.testing.assert_allclose(one, from_pil, atol=1e-6)
    short = pred.encode_image([str(path), Image.open(path)], dim=16)
    assert short.shape == (2, 16)
    np.testing.assert_allclose(np.linalg.norm(short, axis=1), 1.0, atol=1e-5)


def test_clip_text_and_images_share_one_space(trained):
    records = [json.loads(line) for line in trained.eval_path.read_text().splitlines()]
    pred = Predictor(trained.checkpoint, device="cpu")
    texts = pred.encode_text([r["query"] for r in records])
    images = pred.encode_image([str(trained.data_dir / r["positive_image"]) for r in records])
    sims = texts @ images.T
    matched = np.diag(sims).mean()
    others = (sims.sum() - np.trace(sims)) / (sims.size - len(sims))
    assert matched > others + 0.1, (matched, others)


def test_clip_cli_encodes_text_and_images(trained, tmp_path):
    image = sorted((trained.data_dir / "images").glob("*.png"))[0]
    out = tmp_path / "emb.npy"
    assert cli(["encode", str(trained.merged), "--text", "a red circle", "--image", str(image), "--output", str(out)]) == 0
    emb = np.load(out)
    assert emb.shape == (2, Predictor(trained.merged, device="cpu").dim)


@pytest.mark.parametrize("mode, query_kind, doc_kind", [("i2t", "image", "text"), ("i2i", "image", "image")])
def test_clip_evaluation_in_image_query_modes(trained, mode, query_kind, doc_kind):
    from vembed.data import read_records
    from vembed.data.images import RecordImages

    records = list(read_records(trained.eval_path, transform=RecordImages(trained.eval_path.parent, mode)))
    queries, docs, qrels = build_retrieval_set(records)
    assert all(getattr(q, query_kind) is not None and getattr(q, "text" if query_kind == "image" else "image") is None
               for q in queries)
    assert all(getattr(d, doc_kind) is not None for d in docs)
    assert len(queries) == len(docs) == 48
    results = compare_models({"tuned": str(trained.checkpoint)}, trained.eval_path, retrieval_mode=mode)
    assert set(results["tuned"]["full"]) == {"recall@1", "recall@5", "recall@10", "mrr@10", "ndcg@10"}
    assert all(0.0 <= v <= 1.0 for v in results["tuned"]["full"].values())


def test_clip_training_reports_a_bad_image_with_its_line(tiny_clip, tmp_path):
    red_square().save(tmp_path / "ok.png")
    lines = [{"query": "a red square", "positive_image": "ok.png"},
             {"query": "a missing one", "positive_image": "gone.png"}]
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in lines))
    cfg = load_config(None, {"model_name": tiny_clip, "data_path": str(data), "output_dir": str(tmp_path / "out")})
    with pytest.raises(DataError, match=rf"{data}:2: image 'gone.png' not found"):
        train(cfg)
