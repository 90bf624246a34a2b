"""model/teacher.py: no gradient reaches the EMA teacher, an update is the EMA formula, eval mode
always, the momentum schedule's end points, and a state_dict round trip that continues bit for bit."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import nn

from model.dino import DINOHead
from model.teacher import EMATeacher, teacher_momentum
from pipeline.errors import ConfigError


def _student(seed: int = 0) -> nn.Module:
    """A small encoder + DINO head: linear, LayerNorm, BatchNorm (a buffer), dropout, weight-norm head."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(6, 12),
        nn.LayerNorm(12),
        nn.BatchNorm1d(12),
        nn.Dropout(0.5),
        DINOHead(12, 16, hidden_dim=20, bottleneck_dim=8),
    )


def _perturb(module: nn.Module, seed: int) -> None:
    """One fake optimizer step on the trainable parameters, and new batch statistics."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.1)
        module(torch.randn(8, 6, generator=gen))  # train-mode BatchNorm updates its running stats


def test_no_gradient_reaches_the_teacher():
    student = _student()
    teacher = EMATeacher(student)
    x = torch.randn(8, 6, requires_grad=True)
    target = teacher(x)
    assert target.grad_fn is None and not target.requires_grad
    loss = -(target.softmax(-1) * student(x).log_softmax(-1)).sum()
    loss.backward()
    assert all(not p.requires_grad and p.grad is None for p in teacher.parameters())
    trained = [p for p in student.parameters() if p.requires_grad]
    assert trained and all(p.grad is not None for p in trained)


def test_update_is_the_ema_formula():
    student = _student()
    teacher = EMATeacher(student)
    _perturb(student, 1)
    before = {n: p.clone() for n, p in teacher.module.named_parameters()}
    m = 0.996
    teacher.update(student, m)
    for name, s in student.named_parameters():
        want = m * before[name] + (1 - m) * s.detach()
        torch.testing.assert_close(teacher.module.get_parameter(name), want, rtol=0, atol=1e-7, msg=name)
    changed = [n for n, p in teacher.module.named_parameters() if not torch.equal(p, before[n])]
    assert len(changed) == sum(p.requires_grad for p in student.parameters())  # the fixed gain stays 1
    for (name, b), s in zip(teacher.module.named_buffers(), student.buffers()):
        assert torch.equal(b, s), name


def test_momentum_one_keeps_and_zero_copies():
    student = _student()
    teacher = EMATeacher(student)
    frozen = [p.clone() for p in teacher.parameters()]
    _perturb(student, 2)
    teacher.update(student, 1.0)
    assert all(torch.equal(a, b) for a, b in zip(teacher.parameters(), frozen))
    teacher.update(student, 0.0)
    assert all(torch.equal(a, b) for a, b in zip(teacher.parameters(), student.parameters()))
    with pytest.raises(ConfigError, match="momentum"):
        teacher.update(student, 1.5)


def test_update_rejects_another_model():
    teacher = EMATeacher(_student())
    with pytest.raises(ValueError, match="not the ones the teacher was copied from"):
        teacher.update(nn.Linear(6, 12), 0.99)


def test_teacher_stays_in_eval_mode():
    teacher = EMATeacher(_student().train())
    teacher.train()
    assert not any(m.training for m in teacher.module.modules())
    x = torch.randn(8, 6)
    assert torch.equal(teacher(x), teacher(x))  # dropout off, BatchNorm on running statistics


def test_state_dict_round_trip_continues_bit_for_bit():
    student = _student()
    straight = EMATeacher(student)
    for step in range(3):
        _perturb(student, 10 + step)
        straight.update(student, teacher_momentum(step, 6, 0.992))
    saved = {k: v.clone() for k, v in straight.state_dict().items()}

    resumed = EMATeacher(_student(seed=5))  # built from another initialisation, then restored
    resumed.load_state_dict(saved)
    assert saved.keys() == resumed.state_dict().keys()
    for step in range(3, 6):
        _perturb(student, 10 + step)
        straight.update(student, teacher_momentum(step, 6, 0.992))
        resumed.update(student, teacher_momentum(step, 6, 0.992))
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("base", [0.996, 0.992])
def test_momentum_schedule_is_a_cosine_to_one(base):
    total = 100
    values = [teacher_momentum(s, total, base) for s in range(total + 1)]
    assert values[0] == pytest.approx(base) and values[-1] == pytest.approx(1.0)
    assert values[50] == pytest.approx((base + 1) / 2)
    assert values[25] == pytest.approx(1 - (1 - base) * (1 + math.cos(math.pi / 4)) / 2)
    assert all(a <= b for a, b in itertools.pairwise(values))
    assert teacher_momentum(total + 7, total, base) == pytest.approx(1.0)
    with pytest.raises(ConfigError, match="total_steps > 0"):
        teacher_momentum(0, 0, base)
