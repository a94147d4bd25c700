"""The Distiller: frozen teacher, loss terms per method, usable in a hand-written loop."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from locakd import dkd_loss, kd_loss
from locakd.distiller import METHODS, Distiller
from locakd.errors import ConfigError
from locakd.training.image_config import MethodConfig


def _nets(seed: int = 0) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(seed)
    student = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 5))
    teacher = nn.Sequential(
        nn.Linear(8, 32), nn.BatchNorm1d(32), nn.Dropout(0.5), nn.ReLU(), nn.Linear(32, 5)
    )
    return student, teacher


def _batch(n: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 8, generator=g), torch.randint(0, 5, (n,), generator=g)


def test_teacher_stays_in_eval_mode_and_gets_no_gradient():
    student, teacher = _nets()
    teacher.train()
    distiller = Distiller(student, teacher, "kd+loca")
    distiller.train()
    assert student.training
    assert not teacher.training and not any(m.training for m in teacher.modules())
    assert all(not p.requires_grad for p in teacher.parameters())
    x, y = _batch()
    bn = teacher[1]
    stats = bn.running_mean.clone()
    teacher.train()  # even if someone flips it directly, the distiller puts it back
    logits, losses = distiller(x, y)
    assert not teacher.training
    assert torch.equal(bn.running_mean, stats)  # no BatchNorm update in eval mode
    sum(losses.values()).backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert all(p.grad is not None for p in student.parameters())
    assert logits.shape == (12, 5)


def test_teacher_forward_is_deterministic_despite_dropout():
    student, teacher = _nets()
    distiller = Distiller(student, teacher, "kd").train()
    x, _ = _batch()
    assert torch.equal(distiller.teacher_logits(x), distiller.teacher_logits(x))


@pytest.mark.parametrize("method", METHODS)
def test_every_method_returns_finite_losses_with_gradient(method):
    student, teacher = _nets()
    distiller = Distiller(student, teacher, method, ce_weight=0.1, kd_weight=0.9).train()
    x, y = _batch()
    logits, losses = distiller(x, y, epoch=0)
    assert set(losses) == ({"ce"} if method == "ce" else {"ce", "kd"})
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    assert student[0].weight.grad is not None


def test_loss_terms_match_the_pure_functions():
    student, teacher = _nets()
    x, y = _batch()
    teacher.eval()
    zs, zt = student(x), teacher(x).detach()
    ce = nn.functional.cross_entropy(zs, y)
    d = Distiller(student, teacher, "kd+loca", temperature=4.0, ce_weight=0.1, kd_weight=0.9, loca_alpha=0.9)
    # The Distiller calls the same functions on the same tensors: equal bit for bit.
    _, losses = d(x, y)
    assert torch.equal(losses["ce"], 0.1 * ce)
    assert torch.equal(losses["kd"], 0.9 * kd_loss(zs, zt, 4.0, y, loca_alpha=0.9))
    d = Distiller(student, teacher, "dkd", temperature=4.0, ce_weight=1.0, kd_weight=1.0, dkd_beta=2.0)
    _, losses = d(x, y)
    assert torch.equal(losses["kd"], dkd_loss(zs, zt, y, alpha=1.0, beta=2.0, temperature=4.0))
    d = Distiller(student, teacher, "dkd+loca", dkd_beta=2.0, kd_weight=1.0)
    _, losses = d(x, y)
    assert torch.equal(losses["kd"], dkd_loss(zs, zt, y, beta=2.0, loca_alpha=0.9))
    d = Distiller(student, teacher, "ka_smooth", smoothing=0.2, kd_weight=1.0)
    _, losses = d(x, y)
    assert torch.equal(losses["kd"], kd_loss(zs, zt, 4.0, y, target_transform="ka_smooth", smoothing=0.2))


def test_dkd_warmup_ramps_the_kd_term_linearly():
    student, teacher = _nets()
    x, y = _batch()
    d = Distiller(student, teacher, "dkd", kd_weight=1.0, warmup_epochs=4)
    full = d(x, y)[1]["kd"]
    for epoch, factor in [(0, 0.25), (1, 0.5), (3, 1.0), (10, 1.0)]:
        # the same loss times the same factor (1.0 * factor, exact): equal bit for bit
        assert torch.equal(d(x, y, epoch=epoch)[1]["kd"], factor * full)
    assert d.kd_factor(None) == 1.0


def test_usable_in_a_users_own_loop():
    student, teacher = _nets()
    distiller = Distiller(student, teacher, "kd+loca", ce_weight=0.5, kd_weight=0.5)
    opt = torch.optim.SGD(distiller.student_parameters(), lr=0.1)
    x, y = _batch(64)
    teacher_before = [p.clone() for p in teacher.parameters()]
    first = None
    for _ in range(30):
        _, losses = distiller(x, y)
        loss = sum(losses.values())
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < first
    assert all(torch.equal(a, b) for a, b in zip(teacher_before, teacher.parameters(), strict=True))


def test_from_config_uses_every_method_field():
    student, teacher = _nets()
    cfg = MethodConfig(name="dkd+loca", temperature=2.0, dkd_beta=6.0, warmup_epochs=20, loca_alpha=0.95)
    d = Distiller.from_config(student, teacher, cfg)
    assert (d.method, d.temperature, d.dkd_beta, d.warmup_epochs, d.loca_alpha) == (
        "dkd+loca",
        2.0,
        6.0,
        20,
        0.95,
    )
    names = {f.name for f in dataclasses.fields(MethodConfig)} - {"name"}
    assert names <= set(vars(d))


def test_config_errors():
    student, teacher = _nets()
    with pytest.raises(ConfigError, match="unknown distillation method 'kdd'"):
        Distiller(student, teacher, "kdd")
    with pytest.raises(ConfigError, match="needs a teacher"):
        Distiller(student, None, "kd")
    with pytest.raises(ConfigError, match="kd\\+loca only"):
        Distiller(student, teacher, "dkd", calibrate_correct=True)
    d = Distiller(student, None, "ce")  # ce trains without a teacher
    _, losses = d(*_batch())
    assert set(losses) == {"ce"}
