import pytest

torch = pytest.importorskip("torch")

from coverwatch.model.losses import batch_all_triplet, batch_hard_triplet, cover_loss  # noqa: E402
from coverwatch.model.train import get_lr  # noqa: E402
from coverwatch.streamer.config import TrainConfig  # noqa: E402


def test_triplet_zero_when_groups_are_well_separated():
    emb = torch.tensor([[1.0, 0.0], [0.99, 0.14], [-1.0, 0.0], [-0.99, -0.14]])
    labels = torch.tensor([0, 0, 1, 1])
    assert float(batch_hard_triplet(emb, labels, margin=0.3)) == pytest.approx(0.0)


def test_triplet_hand_computed_violation():
    # anchor 0: positive at 90 deg (d=1), negative identical (d=0): loss = 1 - 0 + 0.3
    emb = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    labels = torch.tensor([0, 0, 1])
    # anchor 1: positive 0 at d=1, negative 2 at d=1 -> 0.3; anchor 2 has no positive (ignored)
    assert float(batch_hard_triplet(emb, labels, margin=0.3)) == pytest.approx((1.3 + 0.3) / 2)


def test_batch_all_triplet_averages_violating_triplets():
    # Same points as above. Triplets (a, p, n): (0, 1, 2): 1 - 0 + 0.3 = 1.3; (1, 0, 2): 1 - 1 + 0.3 = 0.3.
    emb = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    labels = torch.tensor([0, 0, 1])
    assert float(batch_all_triplet(emb, labels, margin=0.3)) == pytest.approx((1.3 + 0.3) / 2)
    # well separated groups: no violating triplet, loss 0
    far = torch.tensor([[1.0, 0.0], [0.99, 0.14], [-1.0, 0.0], [-0.99, -0.14]])
    assert float(batch_all_triplet(far, torch.tensor([0, 0, 1, 1]), margin=0.3)) == 0.0


def test_cover_loss_skips_zero_weight_terms():
    metric = torch.randn(4, 8, requires_grad=True)
    logits = torch.randn(4, 2)
    labels = torch.tensor([0, 0, 1, 1])
    total, terms = cover_loss(metric, logits, labels, margin=0.3, mining="hard", triplet_weight=1.0, ce_weight=0.0, label_smoothing=0.0)
    assert set(terms) == {"triplet"}
    total, terms = cover_loss(metric, logits, labels, margin=0.3, mining="all", triplet_weight=1.0, ce_weight=1.0, label_smoothing=0.0)
    assert set(terms) == {"triplet", "ce"}
    assert float(total.detach()) == pytest.approx(terms["triplet"] + terms["ce"], rel=1e-5)


def test_lr_schedule_warmup_then_cosine():
    cfg = TrainConfig(steps=1000, warmup_steps=100, lr=1e-3, min_lr_fraction=0.1)
    assert get_lr(0, cfg) == pytest.approx(1e-5)
    assert get_lr(99, cfg) == pytest.approx(1e-3)
    assert get_lr(550, cfg) == pytest.approx(1e-4 + 0.5 * 9e-4, rel=1e-6)
    assert get_lr(1000, cfg) == pytest.approx(1e-4)


def test_outside_hinge_pushes_only_the_out_of_catalog_maximum_above_the_ceiling():
    from coverwatch.model.losses import outside_similarity_hinge

    # covers at 0 and 90 degrees; outside crop -1 at cosine 0.8 to the first, -2 orthogonal to both
    emb = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.8, 0.0, 0.6], [0.0, 0.0, 1.0]], requires_grad=True)
    labels = torch.tensor([0, 1, -1, -2])
    hinge = outside_similarity_hinge(emb, labels, ceiling=0.3)
    assert float(hinge) == pytest.approx((0.8 - 0.3 + 0.0) / 2)
    hinge.backward()
    assert emb.grad[3].abs().sum() == 0  # below the ceiling: no push
    assert emb.grad[2].abs().sum() > 0 and emb.grad[0].abs().sum() > 0
    assert float(outside_similarity_hinge(emb, torch.tensor([0, 0, 1, 1]), ceiling=0.3)) == 0.0


def test_out_of_catalog_rows_are_negatives_of_every_group_and_never_classified():
    emb = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    # the third row, out of catalog, sits on anchor 0: it is the hardest negative of both anchors
    outside = torch.tensor([0, 0, -1])
    assert float(batch_hard_triplet(emb, outside, margin=0.3)) == pytest.approx((1.3 + 0.3) / 2)
    logits = torch.tensor([[5.0, 0.0], [5.0, 0.0], [0.0, 5.0]])
    _, with_outside = cover_loss(
        emb, logits, outside, margin=0.3, mining="all", triplet_weight=0.0, ce_weight=1.0, label_smoothing=0.0,
        outside_weight=1.0, outside_ceiling=0.5,
    )  # fmt: skip
    _, covers_only = cover_loss(
        emb[:2], logits[:2], outside[:2], margin=0.3, mining="all", triplet_weight=0.0, ce_weight=1.0, label_smoothing=0.0
    )
    assert with_outside["ce"] == pytest.approx(covers_only["ce"])  # the outside row's logits are ignored
    assert with_outside["outside"] == pytest.approx(0.5)  # cosine 1.0 to cover 0, ceiling 0.5


def test_outside_hinge_also_sees_the_bank_of_earlier_covers():
    from coverwatch.model.losses import outside_similarity_hinge

    emb = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]], requires_grad=True)
    labels = torch.tensor([0, -1])  # the outside row is orthogonal to this batch's only cover
    assert float(outside_similarity_hinge(emb, labels, ceiling=0.3)) == 0.0
    bank = torch.tensor([[0.0, 0.6, 0.8]])  # an earlier cover at cosine 0.8 to it
    hinge = outside_similarity_hinge(emb, labels, ceiling=0.3, bank=bank)
    assert float(hinge) == pytest.approx(0.5)
    hinge.backward()
    assert emb.grad[1].abs().sum() > 0 and emb.grad[0].abs().sum() == 0
