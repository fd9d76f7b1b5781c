"""GroupLoss against the formula written out pair by pair: centre, both temperatures, skipped same-index pairs."""

import pytest
import torch
import torch.nn.functional as F

from mugs.model.losses import GroupLoss


def _direct(student, teacher, center, n_crops, t_student, t_teacher):
    """Mean over the 2 x (n_crops - 1) valid (teacher crop, student crop) pairs, large and small kept apart."""
    b = teacher.shape[0] // 2
    s_crops, t_crops = student.split(b), teacher.split(b)
    large, small = [], []
    for ti, t in enumerate(t_crops):
        q = F.softmax((t - center) / t_teacher, dim=-1)
        for si, s in enumerate(s_crops):
            if si == ti:
                continue
            ce = (-q * F.log_softmax(s / t_student, dim=-1)).sum(-1).mean()
            (large if si < 2 else small).append(ce)
    assert len(large) == 2 and len(small) == 2 * (n_crops - 2)
    return 0.5 * (sum(large) / len(large) + sum(small) / len(small))


@pytest.mark.parametrize("epoch, t_teacher", [(0, 0.04), (1, 0.055), (2, 0.07), (9, 0.07)])
def test_group_loss_matches_the_direct_formula(epoch, t_teacher):
    torch.manual_seed(0)
    n_crops, b, g = 5, 3, 11
    loss = GroupLoss(
        g,
        warmup_teacher_temp=0.04,
        teacher_temp=0.07,
        warmup_teacher_temp_epochs=3,
        student_temp=0.1,
        center_momentum=0.9,
    )
    loss.center.copy_(torch.randn(1, g))
    student, teacher = torch.randn(n_crops * b, g), torch.randn(2 * b, g)
    assert loss.teacher_temp(epoch) == pytest.approx(t_teacher)
    ref = _direct(student, teacher, loss.center, n_crops, 0.1, t_teacher)
    assert loss(student, teacher, n_crops, epoch).item() == pytest.approx(ref.item(), rel=1e-6)


def test_same_index_pair_is_skipped_and_the_centre_matters():
    torch.manual_seed(1)
    n_crops, b, g = 4, 2, 7
    loss = GroupLoss(g, 0.04, 0.04, 0, student_temp=0.1, center_momentum=0.9)
    teacher = torch.randn(2 * b, g)
    student = torch.randn(n_crops * b, g)
    base = loss(student, teacher, n_crops, 0)
    # student crop 0 made the sharpened copy of teacher crop 0: were the (0, 0) pair counted, the loss
    # would drop well below the formula that skips it
    matched = student.clone()
    matched[:b] = teacher[:b] * (0.1 / 0.04)  # student crop 0 = teacher crop 0's sharpened logits
    direct = _direct(matched, teacher, loss.center, n_crops, 0.1, 0.04)
    assert loss(matched, teacher, n_crops, 0).item() == pytest.approx(direct.item(), rel=1e-6)
    loss.center.fill_(0.5)  # a constant centre shifts every logit equally: softmax unchanged
    assert loss(student, teacher, n_crops, 0).item() == pytest.approx(base.item(), rel=1e-6)
    loss.center.copy_(torch.randn(1, g))
    assert loss(student, teacher, n_crops, 0).item() != pytest.approx(base.item())


def test_centre_update_is_an_ema_of_the_batch_mean():
    loss = GroupLoss(3, 0.04, 0.04, 0, student_temp=0.1, center_momentum=0.9)
    teacher = torch.tensor([[1.0, 2.0, 3.0], [3.0, 2.0, 1.0]])
    loss.update_center(teacher)
    assert torch.allclose(loss.center, 0.1 * torch.tensor([[2.0, 2.0, 2.0]]))
