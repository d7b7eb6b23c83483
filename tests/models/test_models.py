import pytest
import torch

from vembed.config import load_config
from vembed.errors import ConfigError
from vembed.models import Item, load_embedder
from vembed.models.lora import apply_lora, resolve_target_modules
from vembed.models.pooling import last_token_pool, mean_pool


def test_last_token_pool_either_padding_side():
    hidden = torch.arange(2 * 4 * 1, dtype=torch.float32).view(2, 4, 1)
    right = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    left = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    assert last_token_pool(hidden, right).flatten().tolist() == [1.0, 7.0]
    assert last_token_pool(hidden, left).flatten().tolist() == [3.0, 7.0]


def test_mean_pool_ignores_padding():
    hidden = torch.tensor([[[1.0], [3.0], [100.0]]])
    assert mean_pool(hidden, torch.tensor([[1, 1, 0]])).item() == 2.0


@pytest.mark.parametrize("side", ["left", "right"])
def test_qwen3_embeddings_independent_of_padding_side(tmp_path, side):
    from tests.support.tiny_models import make_tiny_qwen3

    path = make_tiny_qwen3(tmp_path / side, padding_side=side)
    emb = load_embedder(str(path))
    assert emb.spec.pooling == "last_token"
    texts = [Item(text="short"), Item(text="a much longer sentence with many more tokens in it")]
    batched = emb.embed_items(texts, batch_size=2)
    single = torch.cat([emb.embed_items([t], batch_size=1) for t in texts])
    torch.testing.assert_close(batched, single, atol=1e-5, rtol=1e-5)


def test_family_default_pooling(tiny_bert, minilm_path):
    assert load_embedder(tiny_bert).spec.pooling == "mean"
    # sentence-transformers directories say how they pool and normalise
    spec = load_embedder(minilm_path).spec
    assert (spec.pooling, spec.normalize) == ("mean", True)


def test_query_instruction_prefix(tiny_bert, tiny_qwen3):
    bert = load_embedder(tiny_bert, query_instruction="query: ")
    plain = bert.featurize(Item(text="cats"), is_query=False)["input_ids"]
    instructed = bert.featurize(Item(text="cats"), is_query=True)["input_ids"]
    assert len(instructed) > len(plain)
    qwen = load_embedder(tiny_qwen3, query_instruction="Find docs")
    ids = qwen.featurize(Item(text="cats"), is_query=True)["input_ids"]
    assert "instruct : find docs" in qwen.tokenizer.decode(ids).lower()


def test_target_modules_apply_only_existing_names(tiny_bert):
    emb = load_embedder(tiny_bert)
    assert resolve_target_modules(emb.backbone, ["q_proj", "v_proj", "query", "value"]) == ["query", "value"]


def test_target_modules_none_match_lists_linear_names(tiny_bert):
    emb = load_embedder(tiny_bert)
    with pytest.raises(ConfigError, match=r"lora_target_modules: none of \['q_proj'\].*query.*value"):
        resolve_target_modules(emb.backbone, ["q_proj"])


def test_guide_default_targets_skip_unused_pooler(tiny_bert):
    cfg = load_config(None, {"model_name": tiny_bert})
    emb = apply_lora(load_embedder(tiny_bert), cfg)
    adapted = {n for n, _ in emb.named_modules() if n.endswith("lora_A")}
    assert adapted and not any("pooler" in n for n in adapted)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_lora_gradients_flow(tiny_bert, checkpointing):
    cfg = load_config(None, {"model_name": tiny_bert, "gradient_checkpointing": checkpointing})
    emb = apply_lora(load_embedder(tiny_bert), cfg)
    emb.train()
    assert emb.backbone.get_base_model().is_activation_checkpointing is checkpointing
    batch = emb.collate([emb.featurize(Item(text=t), False) for t in ["one two", "three four five"]])
    emb(**batch).pow(2).sum().backward()
    grads = [p.grad for n, p in emb.named_parameters() if "lora_B" in n]
    assert grads and all(g is not None for g in grads)
    # lora_B starts at zero, so its gradient is what makes training move
    assert sum(g.abs().sum().item() for g in grads) > 0
    frozen = [p for n, p in emb.named_parameters() if "lora_" not in n]
    assert all(not p.requires_grad for p in frozen)


def test_modules_to_save(tiny_bert):
    cfg = load_config(None, {"model_name": tiny_bert, "modules_to_save": ["embeddings", "classifier"]})
    emb = apply_lora(load_embedder(tiny_bert), cfg)
    trainable = [n for n, p in emb.named_parameters() if p.requires_grad]
    assert any("modules_to_save" in n and "embeddings" in n for n in trainable)


def test_unknown_model_is_config_error(tmp_path):
    # A missing local path says so; a name shaped like a hub id is tried (offline) and fails to load.
    with pytest.raises(ConfigError, match=r"model_name: .*missing-model does not exist"):
        load_embedder(str(tmp_path / "missing-model"))
    with pytest.raises(ConfigError, match="model_name: cannot load 'no-such-org/no-such-model'"):
        load_embedder("no-such-org/no-such-model")
