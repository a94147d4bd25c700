"""FrozenTeacher (locakd.teachers): eval mode from construction, never back to train mode, no autograd."""

import torch
from torch import nn

from locakd.teachers import FrozenTeacher, freeze_teacher


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Dropout(0.5), nn.Linear(8, 3))


def test_the_wrapper_and_the_model_are_in_eval_mode_from_construction():
    model = _model().train()
    teacher = FrozenTeacher(model)
    assert not teacher.training  # the wrapper's own flag, before anyone calls .train() / .eval()
    assert not any(m.training for m in teacher.modules())
    assert not any(p.requires_grad for p in teacher.parameters())


def test_train_mode_never_reaches_the_teacher_and_its_output_carries_no_graph():
    teacher = FrozenTeacher(_model())

    class Parent(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.student = nn.Linear(4, 3)
            self.teacher = teacher

    parent = Parent().train()
    assert parent.student.training and not teacher.training and not teacher.module.training
    x = torch.randn(5, 4, requires_grad=True)
    first = teacher(x)
    assert first.grad_fn is None
    teacher.module.train()  # a direct call on the inner model is undone by the next forward
    assert torch.equal(teacher(x), first)  # eval: no dropout noise, BatchNorm running statistics
    assert not teacher.module.training


def test_wrapping_twice_does_not_nest_and_freeze_teacher_returns_the_model():
    model = _model()
    once = FrozenTeacher(model)
    twice = FrozenTeacher(once)
    assert twice.module is model and not twice.training
    plain = _model().train()
    assert freeze_teacher(plain) is plain and not plain.training
