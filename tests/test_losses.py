import pytest
import torch
import torch.nn.functional as F

from vembed.losses import InfoNCELoss, MatryoshkaLoss, resolve_mrl_dims


def reference_info_nce(q, p, n, t):
    """Written out per query: softmax over all positives, then all negatives."""
    q, p = F.normalize(q, dim=-1), F.normalize(p, dim=-1)
    n = F.normalize(n, dim=-1) if n is not None else torch.empty(0, q.size(1))
    total = 0.0
    for i in range(q.size(0)):
        cands = torch.cat([p, n])
        logits = torch.stack([q[i] @ c for c in cands]) / t
        total += -(logits[i] - torch.logsumexp(logits, 0))
    return total / q.size(0)


def test_info_nce_keeps_in_batch_and_adds_hard_negatives():
    torch.manual_seed(0)
    q, p, n = torch.randn(4, 8), torch.randn(4, 8), torch.randn(6, 8)
    loss = InfoNCELoss(0.05)
    torch.testing.assert_close(loss(q, p, n), reference_info_nce(q, p, n, 0.05))
    torch.testing.assert_close(loss(q, p), reference_info_nce(q, p, None, 0.05))
    # hard negatives add to the pool: the loss can only grow
    assert loss(q, p, n) > loss(q, p)


def test_matryoshka_trains_every_dim():
    torch.manual_seed(0)
    q = torch.randn(4, 16, requires_grad=True)
    p = torch.randn(4, 16)
    dims, weights = [16, 8, 4], [1.0, 0.5, 0.25]
    loss = MatryoshkaLoss(InfoNCELoss(0.1), dims, weights)
    expected = sum(w * reference_info_nce(q[:, :d], p[:, :d], None, 0.1) for d, w in zip(dims, weights, strict=True)) / 1.75
    torch.testing.assert_close(loss(q, p), expected)
    # each truncated prefix receives gradient from its own term
    for d in dims:
        qd = q.detach().clone().requires_grad_(True)
        MatryoshkaLoss(InfoNCELoss(0.1), [d])(qd, p).backward()
        assert qd.grad[:, :d].abs().sum() > 0 and qd.grad[:, d:].abs().sum() == 0


def test_matryoshka_validates_lengths_and_dims():
    with pytest.raises(ValueError, match="mrl_weights has 1 entries but mrl_dims has 2"):
        MatryoshkaLoss(InfoNCELoss(), [8, 4], [1.0])
    with pytest.raises(ValueError, match="exceed the embedding dim"):
        MatryoshkaLoss(InfoNCELoss(), [32, 4])(torch.randn(2, 16), torch.randn(2, 16))


def test_default_mrl_dims():
    assert resolve_mrl_dims(None, 384) == [384, 192, 96, 48]
