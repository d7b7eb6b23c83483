"""FSDP RAM-efficient loading on two CPU processes: rank 0 reads the weights, rank 1 starts on the
meta device and receives them through FSDP's sync from rank 0, one shard unit at a time.

The model is wide in its MLP layers and narrow elsewhere (about 110 MB of fp32 weights, most of it
in 32 equal transformer blocks), so that a full copy shows clearly in a process's resident memory.
glibc is told to return freed blocks over 64 KiB to the system at once, so that resident memory
follows what is live rather than the allocator's caching. Training from rank 0's weights is checked
by tests/training/test_fsdp.py, whose FSDP runs load the same way (every FSDP run does) and must match one
process exactly.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.support.scaleout_helpers import accelerate_launch, base_config, write_config, write_pairs

WORKER = "tests/support/fsdp_loading_worker.py"

pytestmark = pytest.mark.slow  # real multi-process launches


def wide_bert(path: Path) -> Path:
    import torch
    from transformers import BertConfig, BertModel

    from tests.support.tiny_models import _tokenizer

    torch.manual_seed(0)
    tok = _tokenizer()
    cfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=64, num_hidden_layers=32, num_attention_heads=2,
                     intermediate_size=6144, max_position_embeddings=64)
    BertModel(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def launch(root: Path, name: str, *flags: str) -> list[dict[str, int]]:
    cfg = base_config(root / "wide_bert", root / "pairs.jsonl", root / name, use_fsdp=True, batch_size=4)
    out = root / f"{name}-memory"
    out.mkdir()
    with pytest.MonkeyPatch.context() as env:
        env.setenv("MALLOC_MMAP_THRESHOLD_", str(64 * 1024))
        accelerate_launch([WORKER, str(write_config(root / f"{name}.yaml", cfg)), str(out), *flags])
    return [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("fsdp_loading")
    wide_bert(root / "wide_bert")
    write_pairs(root / "pairs.jsonl", 8, negatives_every=0)
    return root


def grew(rank: dict[str, int]) -> int:
    return rank["peak_rss_after_prepare"] - rank["rss_before_load"]


def test_rank_1_never_holds_the_full_weights(root):
    rank0, rank1 = launch(root, "rank0-loads")
    full = rank0["full_bytes"]
    assert rank1["full_bytes"] == full > 100e6
    assert rank0["held_after_load"] == full
    assert rank1["held_after_load"] == 0  # every parameter on the meta device
    # Peak resident memory from before loading until FSDP has wrapped, synced and sharded the model:
    # rank 0 holds the loaded copy and FSDP's flat copy of it; rank 1 its shards and one unit at a time.
    assert grew(rank0) >= full, (grew(rank0), full)  # the measurement sees a full copy where there is one
    assert grew(rank1) <= 0.6 * grew(rank0), (grew(rank1), grew(rank0), full)


def test_control_every_rank_loading_peaks_at_a_full_copy_on_rank_1(root):
    """The same measurement fails the bound above when rank 1 reads the checkpoint itself."""
    rank0, rank1 = launch(root, "every-rank-loads", "--every-rank-loads")
    assert rank1["held_after_load"] == rank1["full_bytes"]
    assert grew(rank1) > 0.9 * grew(rank0) and grew(rank1) > rank1["full_bytes"], (grew(rank1), grew(rank0))
