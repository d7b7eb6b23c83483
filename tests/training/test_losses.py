import pytest
import torch
import torch.nn.functional as F

from vembed.training.losses import InfoNCELoss, MatryoshkaLoss, resolve_mrl_dims


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
    assert resolve_mrl_dims(None, 384) == [384]
    assert resolve_mrl_dims(None, 4096) == [4096]


def reference_masked_info_nce(q, p, n, ids_p, ids_n, t):
    """Per query, written out: drop every candidate (other than the query's own positive) whose
    content id equals that positive's id, then softmax over what is left."""
    q, p, n = F.normalize(q, dim=-1), F.normalize(p, dim=-1), F.normalize(n, dim=-1)
    cands, ids = torch.cat([p, n]), ids_p + ids_n
    total, masked = 0.0, 0
    for i in range(q.size(0)):
        keep = [j for j in range(len(ids)) if j == i or ids[j] != ids_p[i]]
        masked += len(ids) - len(keep)
        logits = torch.stack([q[i] @ cands[j] for j in keep]) / t
        total += -(logits[keep.index(i)] - torch.logsumexp(logits, 0))
    return total / q.size(0), masked


def test_false_negatives_are_masked_like_the_per_query_reference():
    from vembed.training.losses import false_negative_mask

    torch.manual_seed(0)
    q, p, n = torch.randn(6, 8), torch.randn(6, 8), torch.randn(4, 8)
    # rows 0, 2, 5 share a positive; row 1's positive is also hard negative 3 (of another row)
    ids_p, ids_n = [7, 1, 7, 3, 4, 7], [10, 11, 12, 1]
    p[2], p[5] = p[0], p[0]
    n[3] = p[1]
    mask = false_negative_mask(torch.arange(6), torch.tensor(ids_p + ids_n))
    expected, masked = reference_masked_info_nce(q, p, n, ids_p, ids_n, 0.05)
    assert int(mask.sum()) == masked == 3 * 2 + 1
    torch.testing.assert_close(InfoNCELoss(0.05)(q, p, n, None, mask), expected)
    # without the mask the shared positives count as negatives: a different (larger) loss
    assert InfoNCELoss(0.05)(q, p, n) > expected
    # MRL passes the mask to every dim
    mrl = MatryoshkaLoss(InfoNCELoss(0.05), [8, 4])
    ref4, _ = reference_masked_info_nce(q[:, :4], p[:, :4], n[:, :4], ids_p, ids_n, 0.05)
    torch.testing.assert_close(mrl(q, p, n, None, mask), (expected + ref4) / 2)


def test_false_negative_mask_follows_gathered_labels():
    from vembed.training.losses import false_negative_mask

    # two local queries whose positives sit at rows 2 and 3 of four gathered positives
    ids = torch.tensor([5, 9, 5, 9])
    mask = false_negative_mask(torch.tensor([2, 3]), ids)
    assert mask.tolist() == [[True, False, False, False], [False, True, False, False]]
