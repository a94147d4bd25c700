"""The loss registries: names derived from them, and the robustness every registered loss must have.

Every test below is parametrised over the registries (target transforms x {KD, DKD}, divergences x
{LoCa, none} x {one shot, chunked}), so a new entry is checked for NaN/+inf rejection, -inf
masks, half-precision inputs, logits of +-1e4, all-ignored batches and clear errors without
writing a test for it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import get_args

import pytest
import torch
from core_helpers import IGNORE, RTOL32, logit_scale, loss_atol

import locakd
from locakd import InputError, distiller
from locakd.lm import config as lm_config
from locakd.losses import token as token_module
from locakd.losses.targets import TARGET_TRANSFORMS, TRANSFORMS
from locakd.losses.token import DIVERGENCES, REGISTRY, Divergence


@dataclass(frozen=True)
class Loss:
    """One registered loss, called as ``fn(student, teacher, labels, **kw)``."""

    name: str
    fn: object
    scale: float  # the factor in front of the divergence (T^2 for KD, T^2 (a + b) for DKD)
    temperature: float

    def __call__(self, student, teacher, labels, **kw):
        return self.fn(student, teacher, labels, **kw)


def _transform_losses():
    for name, entry in TRANSFORMS.items():
        alpha = 0.9 if entry.loca else None
        yield Loss(
            f"kd[{name}]",
            lambda s, t, y, name=name, alpha=alpha, **kw: locakd.kd_loss(
                s, t, 2.0, y, loca_alpha=alpha, target_transform=name, **kw
            ),
            4.0,
            2.0,
        )
        yield Loss(
            f"dkd[{name}]",
            lambda s, t, y, name=name, alpha=alpha, **kw: locakd.dkd_loss(
                s, t, y, temperature=2.0, loca_alpha=alpha, target_transform=name, **kw
            ),
            4.0 * 9.0,
            2.0,
        )


def _divergence_losses():
    for name in REGISTRY:
        for alpha in (None, 0.9):
            for chunk in (None, 3):
                label = f"{name}{'+loca' if alpha else ''}{'/chunked' if chunk else ''}"
                yield Loss(
                    label,
                    lambda s, t, y, name=name, alpha=alpha, chunk=chunk, **kw: locakd.token_distill_loss(
                        s, t, y, name, loca_alpha=alpha, chunk_size=chunk, **kw
                    ),
                    1.0,
                    1.0,
                )


LOSSES = {loss.name: loss for loss in (*_transform_losses(), *_divergence_losses())}
HALF = (torch.float16, torch.bfloat16)


def _inputs(shape=(3, 5), classes=11, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    student = (torch.randn(*shape, classes, generator=gen) * 2).to(dtype)
    teacher = (torch.randn(*shape, classes, generator=gen) * 2).to(dtype)
    labels = torch.randint(0, classes, shape, generator=gen)
    labels.view(-1)[::4] = IGNORE
    return student, teacher, labels


# --------------------------------------------------------------------------- names derived from the registries
def test_distiller_method_names_come_from_the_transform_registry():
    kd = tuple(entry.kd_method for entry in TRANSFORMS.values())
    dkd = tuple(entry.dkd_method for entry in TRANSFORMS.values() if entry.dkd_method)
    assert distiller.KD_METHODS == kd and distiller.DKD_METHODS == dkd
    assert distiller.METHODS == ("ce", *kd, *dkd)
    assert get_args(distiller.MethodName) == distiller.METHODS
    loca = [entry for entry in TRANSFORMS.values() if entry.loca]
    assert set(distiller.LOCA_METHODS) == {m for e in loca for m in (e.kd_method, e.dkd_method) if m}
    assert len(set(distiller.METHODS)) == len(distiller.METHODS)
    assert TARGET_TRANSFORMS == tuple(TRANSFORMS) and locakd.TARGET_TRANSFORMS == TARGET_TRANSFORMS


def test_lm_method_names_come_from_the_divergence_registry():
    assert lm_config.BASE_METHODS == {"sft": None, **{d.lm_method: d.name for d in REGISTRY.values()}}
    assert DIVERGENCES == tuple(REGISTRY) and locakd.DIVERGENCES == DIVERGENCES
    for entry in REGISTRY.values():
        for method, loca in ((entry.lm_method, False), (f"{entry.lm_method}+loca", True)):
            spec = lm_config.method_spec(method)
            assert (spec.divergence, spec.loca) == (entry.name, loca)


def test_a_new_divergence_needs_only_its_registry_entry(monkeypatch):
    """Registering an entry (here forward KL under another name) is all token_distill_loss needs."""
    base = REGISTRY["forward_kl"]
    twin = Divergence("twin_kl", "twin", **{k: v for k, v in vars(base).items() if k not in ("name", "lm_method")})
    monkeypatch.setitem(token_module.REGISTRY, "twin_kl", twin)
    student, teacher, labels = _inputs()
    for chunk in (None, 3):
        a = locakd.token_distill_loss(student, teacher, labels, "twin_kl", loca_alpha=0.9, chunk_size=chunk)
        b = locakd.token_distill_loss(student, teacher, labels, "forward_kl", loca_alpha=0.9, chunk_size=chunk)
        assert torch.equal(a, b)


# --------------------------------------------------------------------------- robustness of every registered loss
@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize("which", ["student", "teacher"])
@pytest.mark.parametrize("bad", [math.nan, math.inf], ids=["nan", "+inf"])
@pytest.mark.parametrize("row", ["valid", "ignored"])
def test_nan_or_plus_inf_is_a_clear_error(name, which, bad, row):
    student, teacher, labels = _inputs()
    flat = labels.view(-1)
    index = int((flat != IGNORE).nonzero()[1]) if row == "valid" else int((flat == IGNORE).nonzero()[0])
    target = student if which == "student" else teacher
    target.view(-1, target.shape[-1])[index, 3] = bad
    with pytest.raises(InputError) as info:
        LOSSES[name](student, teacher, labels)
    message = str(info.value).lower()
    assert f"{which}_logits" in message and "nan" in message


@pytest.mark.parametrize("name", LOSSES)
def test_minus_inf_masked_classes_contribute_nothing(name):
    """-inf masks classes (check_logits accepts it). Masked in both models, a class has p = q = 0:
    the value equals the loss over the other classes and the gradient is finite, 0 on the mask."""
    loss = LOSSES[name]
    student, teacher, labels = _inputs()
    labels = labels.clamp(max=8).masked_fill(labels == IGNORE, IGNORE)  # labels inside the unmasked classes
    masked_s, masked_t = student.clone(), teacher.clone()
    masked_s[..., 9:] = -math.inf
    masked_t[..., 9:] = -math.inf
    s = masked_s.requires_grad_(True)
    value = loss(s, masked_t, labels)
    expected = loss(student[..., :9], teacher[..., :9], labels)
    assert bool(torch.isfinite(value))
    zmax = logit_scale(student[..., :9], teacher[..., :9], temperature=loss.temperature)
    # two float32 computations of the same value: twice the rounding of each
    torch.testing.assert_close(value.detach(), expected, rtol=RTOL32, atol=2 * loss_atol(zmax, loss.scale))
    value.backward()
    assert bool(torch.isfinite(s.grad).all()) and float(s.grad[..., 9:].abs().max()) == 0


@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize("dtype", HALF)
def test_half_precision_inputs_give_the_float32_result(name, dtype):
    """fp16/bf16 logits are upcast exactly, so the loss equals that of their float32 copies (the
    math runs in float32 either way); the gradient comes back in the input dtype."""
    loss = LOSSES[name]
    student, teacher, labels = _inputs(dtype=dtype)
    s = student.clone().requires_grad_(True)
    value = loss(s, teacher, labels)
    assert value.dtype == torch.float32 and bool(torch.isfinite(value))
    s32 = student.float().requires_grad_(True)
    value32 = loss(s32, teacher.float(), labels)
    zmax = logit_scale(student, teacher, temperature=loss.temperature)
    torch.testing.assert_close(value.detach(), value32.detach(), rtol=RTOL32, atol=2 * loss_atol(zmax, loss.scale))
    value.backward()
    value32.backward()
    assert s.grad.dtype == dtype and bool(torch.isfinite(s.grad).all())
    # the float32 gradient rounded to the dtype: half an ulp of the dtype (plus float32 rounding)
    info = torch.finfo(dtype)
    torch.testing.assert_close(s.grad.float(), s32.grad.to(dtype).float(), rtol=info.eps, atol=info.tiny * info.eps)


@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize("dtype", (torch.float32, *HALF))
def test_logits_of_1e4_give_finite_values_and_gradients(name, dtype):
    gen = torch.Generator().manual_seed(7)
    shape = (2, 6, 24)
    student = ((torch.randint(0, 2, shape, generator=gen) * 2 - 1) * 1e4).to(dtype).requires_grad_(True)
    teacher = ((torch.randint(0, 2, shape, generator=gen) * 2 - 1) * 1e4).to(dtype)
    labels = torch.randint(0, 24, shape[:-1], generator=gen)
    labels[0, :2] = IGNORE
    value = LOSSES[name](student, teacher, labels)
    assert bool(torch.isfinite(value))
    value.backward()
    assert bool(torch.isfinite(student.grad).all())
    assert float(student.grad[0, :2].abs().max()) == 0  # ignored rows get no gradient


@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "mean/normalizer"])
def test_all_ignored_batch_gives_zero_that_backpropagates(name, reduction):
    """A micro-batch of prompt/padding only (gradient accumulation with a global normaliser):
    loss 0, backward works and gives a zero gradient."""
    student, teacher, labels = _inputs()
    labels = torch.full_like(labels, IGNORE)
    s = student.clone().requires_grad_(True)
    kw = {"reduction": "mean", "normalizer": 10} if reduction == "mean/normalizer" else {"reduction": reduction}
    value = LOSSES[name](s, teacher, labels, **kw)
    assert float(value.detach()) == 0.0
    value.backward()
    assert s.grad is not None and float(s.grad.abs().max()) == 0


@pytest.mark.parametrize("name", LOSSES)
def test_bad_shapes_and_labels_are_clear_errors(name):
    loss = LOSSES[name]
    student, teacher, labels = _inputs()
    with pytest.raises(InputError, match="student_logits shape"):
        loss(student[:, :4], teacher, labels)
    with pytest.raises(InputError, match="vocabulary"):
        loss(student[..., :9], teacher, labels)
    with pytest.raises(InputError, match="labels shape"):
        loss(student, teacher, labels.view(-1))
    for bad in (-1, 11):
        wrong = labels.clone()
        wrong[0, 1] = bad
        with pytest.raises(InputError, match=f"label {bad} is out of range"):
            loss(student, teacher, wrong)
    with pytest.raises(InputError, match="floating-point"):
        loss(student.long(), teacher, labels)
