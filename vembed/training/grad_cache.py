"""GradCache (Gao et al., 2021): the gradient of a large-batch contrastive loss in the memory of one chunk.

1. Embed every chunk without a graph, recording the RNG state before each chunk.
2. Compute the full-batch loss on the cached embeddings (negatives gathered across processes as
   in the plain step) and its gradient with respect to the embeddings.
3. Re-run each chunk with its graph under the recorded RNG state, so dropout draws the same masks,
   and backpropagate the cached gradient: backward of (embedding * grad).sum().

The parameter gradients equal those of one backward through the whole batch (tests/training/test_grad_cache.py).
Under DDP, every re-run chunk but the last runs under `no_sync`, so gradients are all-reduced once.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType

from vembed.config import TrainConfig
from vembed.models.base import Embedder
from vembed.training.compat import get_device_states, set_device_states
from vembed.training.distributed import forwards_in_lockstep, max_over_ranks
from vembed.training.negatives import FalseNegativeMasker, batch_loss

log = logging.getLogger(__name__)

StepFn = Callable[[dict[str, Any]], torch.Tensor]
GROUPS = ("query", "positive", "negatives")
STAND_IN = "stand-in"  # a chunk run only to keep FSDP ranks in step; it adds nothing to the loss


def record_rng(*tensors: torch.Tensor) -> Callable[[], contextlib.AbstractContextManager]:
    """The CPU RNG state and that of the devices `tensors` live on, now. The returned context replays
    them and then puts the surrounding state back, so replaying a chunk does not shift later draws."""
    cpu_state, (devices, device_states) = torch.get_rng_state(), get_device_states(*tensors)

    @contextlib.contextmanager
    def replay() -> Iterator[None]:
        with torch.random.fork_rng(devices=devices):
            torch.set_rng_state(cpu_state)
            set_device_states(devices, device_states)
            yield

    return replay


def split_inputs(inputs: dict[str, Any], chunk_size: int) -> list[dict[str, Any]]:
    """Slice every batch-first tensor into chunks of `chunk_size` rows (padding is kept as is)."""
    tensors = {k: v for k, v in inputs.items() if isinstance(v, torch.Tensor)}
    rows = {k: v.size(0) for k, v in tensors.items()}
    if len(set(rows.values())) != 1 or len(tensors) != len(inputs):
        raise ValueError(
            f"GradCache cannot split inputs {sorted(inputs)} with row counts {rows}; "
            "the embedder must provide split_inputs(inputs, chunk_size)"
        )
    n = next(iter(rows.values()))
    return [{k: v[i : i + chunk_size] for k, v in inputs.items()} for i in range(0, n, chunk_size)]


def splitter_for(embedder: Embedder) -> Callable[[dict[str, Any], int], list[dict[str, Any]]]:
    """The embedder's own `split_inputs` (for inputs that are not one row per item, such as image
    patches), else row slicing."""
    return getattr(embedder, "split_inputs", None) or split_inputs


@dataclass
class Chunk:
    group: str
    inputs: dict[str, Any]
    rng: Callable[[], contextlib.AbstractContextManager]  # replays the RNG of the no-graph pass
    embedding: torch.Tensor  # from the no-graph pass


def grad_cache_step(
    cfg: TrainConfig, accelerator: Accelerator, embedder: Embedder, loss_fn: torch.nn.Module,
    replay_rng: bool = True, masker: FalseNegativeMasker | None = None,
) -> StepFn:  # fmt: skip
    """A step function that does GradCache's forward/backward; it returns the (detached) loss.

    `replay_rng=False` exists only so tests can show that dropout breaks exactness without replay.
    """
    chunk_size = cfg.gradient_cache_chunk_size
    if chunk_size >= cfg.batch_size:
        log.warning(
            "use_gradient_cache: gradient_cache_chunk_size %d >= batch_size %d (per process): each batch is one chunk, "
            "so GradCache saves no memory and only adds a forward pass; set gradient_cache_chunk_size below "
            "batch_size, or use_gradient_cache: false", chunk_size, cfg.batch_size,
        )  # fmt: skip
    splitter = splitter_for(accelerator.unwrap_model(embedder))
    # FSDP's no_sync keeps whole unsharded gradients on every rank; its per-chunk reduce-scatter
    # is linear, so summing reduced chunk gradients is exact and keeps them sharded.
    use_no_sync = accelerator.distributed_type != DistributedType.FSDP
    lockstep = forwards_in_lockstep(accelerator)

    def embed_without_graph(batch: dict[str, Any]) -> list[Chunk]:
        planned = [(g, inputs) for g in GROUPS if g in batch for inputs in splitter(batch[g], chunk_size)]
        if lockstep:  # FSDP: pad with one-row stand-ins to the chunk count of the busiest rank
            stand_in = splitter(batch["positive"], 1)[0]
            planned += [(STAND_IN, stand_in)] * (max_over_ranks(accelerator, len(planned)) - len(planned))
        chunks = []
        with torch.no_grad():
            for group, inputs in planned:
                rng = record_rng(*[v for v in inputs.values() if isinstance(v, torch.Tensor)])
                chunks.append(Chunk(group, inputs, rng, embedder(**inputs)))
        return chunks

    def embedding_grads(chunks: list[Chunk], batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        reps = {
            g: torch.cat([c.embedding for c in chunks if c.group == g]).detach().requires_grad_()
            for g in GROUPS
            if any(c.group == g for c in chunks)
        }
        q, p, n = reps["query"], reps["positive"], reps.get("negatives")
        loss = batch_loss(accelerator, loss_fn, masker, batch, q, p, n, cfg.cross_device_negatives)
        # An embedding the loss does not use gets a zero gradient.
        grads = torch.autograd.grad(loss, list(reps.values()), materialize_grads=True)
        return loss.detach(), dict(zip(reps, grads, strict=True))

    def backward_chunks(chunks: list[Chunk], grads: dict[str, torch.Tensor]) -> None:
        # Each group's gradient cut into its chunks' rows, in chunk order; stand-ins backpropagate zeros.
        pieces = {g: list(grad.split([c.embedding.size(0) for c in chunks if c.group == g])) for g, grad in grads.items()}
        for i, chunk in enumerate(chunks):
            grad = torch.zeros_like(chunk.embedding) if chunk.group == STAND_IN else pieces[chunk.group].pop(0)
            last = i == len(chunks) - 1
            sync = contextlib.nullcontext() if last or not use_no_sync else accelerator.no_sync(embedder)
            replay = chunk.rng() if replay_rng else contextlib.nullcontext()
            with sync:
                with replay:
                    embedding = embedder(**chunk.inputs)
                # The surrogate's gradient w.r.t. the parameters is the loss's gradient.
                accelerator.backward((embedding * grad.to(embedding.dtype)).sum())

    def step(batch: dict[str, Any]) -> torch.Tensor:
        chunks = embed_without_graph(batch)
        loss, grads = embedding_grads(chunks, batch)
        backward_chunks(chunks, grads)
        return loss

    return step

