"""docs/lora-memory.md is computed the way vembed trains: bench.lora_memory's count for MiniLM equals
the trainable parameters of vembed's own LoRA wiring on the real model, and the doc holds its rows."""

from pathlib import Path

from bench.lora_memory import MODELS, RANKS, lora_parameters, markdown
from vembed.config import load_config
from vembed.models import load_embedder
from vembed.models.lora import apply_lora, count_parameters

MINILM = "sentence-transformers/all-MiniLM-L6-v2"
DOC = Path(__file__).resolve().parents[2] / "docs" / "lora-memory.md"


def test_meta_device_count_equals_what_vembed_trains_on_minilm():
    build, targets = MODELS["all-MiniLM-L6-v2"]
    counted, base = lora_parameters(build, targets, 8)
    cfg = load_config(None, {"model_name": MINILM, "lora_r": 8, "lora_target_modules": targets})
    trainable, total = count_parameters(apply_lora(load_embedder(MINILM), cfg))
    assert (counted, base) == (trainable, total - trainable)


def test_doc_holds_the_computed_minilm_rows():
    build, targets = MODELS["all-MiniLM-L6-v2"]
    rows = []
    for rank in RANKS:
        lora, base = lora_parameters(build, targets, rank)
        rows.append({"model": "all-MiniLM-L6-v2", "targets": targets, "rank": rank, "lora": lora, "base": base})
    table = DOC.read_text()
    for line in markdown(rows).splitlines()[2:]:
        assert line in table, line
