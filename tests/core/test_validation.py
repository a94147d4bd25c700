"""Bad input fails early with locakd.InputError (a ValueError) whose message names the problem."""

from __future__ import annotations

import math

import pytest
import torch

import locakd
from locakd import (
    InputError,
    dkd_loss,
    kd_loss,
    loca_calibrate,
    loca_log_calibrate,
    misinstruction_mask,
    misinstruction_rate,
    token_distill_loss,
)

N, C = 4, 6
GOOD_S = torch.randn(N, C, generator=torch.Generator().manual_seed(0))
GOOD_T = torch.randn(N, C, generator=torch.Generator().manual_seed(1))
GOOD_Y = torch.tensor([0, 1, -100, 5])


def _raises(fn, *substrings):
    with pytest.raises(InputError) as info:
        fn()
    message = str(info.value)
    for sub in substrings:
        assert sub.lower() in message.lower(), f"{sub!r} not in {message!r}"
    return message


def test_input_error_is_a_value_error_and_a_locakd_error():
    assert issubclass(InputError, ValueError) and issubclass(InputError, locakd.LocakdError)


# every entry point that takes (teacher) logits and labels
LABELLED = {
    "loca_calibrate": lambda s, t, y: loca_calibrate(t, y),
    "loca_log_calibrate": lambda s, t, y: loca_log_calibrate(t, y),
    "misinstruction_mask": lambda s, t, y: misinstruction_mask(t, y),
    "misinstruction_rate": lambda s, t, y: misinstruction_rate(t, y),
    "kd_loss": lambda s, t, y: kd_loss(s, t, 4.0, y),
    "kd_loss_loca": lambda s, t, y: kd_loss(s, t, 4.0, y, loca_alpha=0.9),
    "dkd_loss": lambda s, t, y: dkd_loss(s, t, y),
    "dkd_loss_loca": lambda s, t, y: dkd_loss(s, t, y, loca_alpha=0.9),
    "token_distill_loss": lambda s, t, y: token_distill_loss(s, t, y),
    "token_distill_loss_loca": lambda s, t, y: token_distill_loss(s, t, y, loca_alpha=0.9, chunk_size=2),
}
PAIRED = {k: v for k, v in LABELLED.items() if not k.startswith(("loca", "misinstruction"))}


@pytest.mark.parametrize("name", LABELLED)
def test_good_input_passes(name):
    LABELLED[name](GOOD_S, GOOD_T, GOOD_Y)


# --------------------------------------------------------------------------- shapes
@pytest.mark.parametrize("name", PAIRED)
def test_student_teacher_shape_mismatch(name):
    _raises(
        lambda: PAIRED[name](torch.randn(N + 1, C), GOOD_T, GOOD_Y), "student_logits shape", "teacher_logits"
    )


@pytest.mark.parametrize("name", PAIRED)
def test_vocabulary_size_mismatch_mentions_the_vocabulary(name):
    message = _raises(lambda: PAIRED[name](torch.randn(N, C + 2), GOOD_T, GOOD_Y), "vocabulary")
    assert str(C + 2) in message and str(C) in message


@pytest.mark.parametrize("name", LABELLED)
@pytest.mark.parametrize(
    "labels",
    [torch.tensor([0, 1, 2]), torch.zeros(N, 1, dtype=torch.long), torch.tensor(0)],
    ids=["short", "extra-dim", "scalar"],
)
def test_labels_shape_mismatch(name, labels):
    _raises(lambda: LABELLED[name](GOOD_S, GOOD_T, labels), "labels shape", str(tuple(labels.shape)))


@pytest.mark.parametrize("name", LABELLED)
@pytest.mark.parametrize("bad", [-1, -5, C, C + 10])
def test_labels_out_of_range(name, bad):
    labels = GOOD_Y.clone()
    labels[1] = bad
    message = _raises(lambda: LABELLED[name](GOOD_S, GOOD_T, labels), "out of range")
    assert str(bad) in message


def test_custom_ignore_index_makes_minus_100_out_of_range():
    _raises(lambda: loca_calibrate(GOOD_T, GOOD_Y, ignore_index=-1), "out of range", "-100")
    ok = torch.tensor([0, -1, 3, 2])
    loca_calibrate(GOOD_T, ok, ignore_index=-1)


@pytest.mark.parametrize("name", LABELLED)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bool])
def test_non_integer_labels(name, dtype):
    labels = GOOD_Y.clamp(min=0).to(dtype)
    _raises(lambda: LABELLED[name](GOOD_S, GOOD_T, labels), "labels", "integer")


def test_labels_not_a_tensor():
    _raises(lambda: loca_calibrate(GOOD_T, [0, 1, 2, 3]), "labels", "tensor")


@pytest.mark.parametrize("logits", [torch.randn(N, 1), torch.randn(())], ids=["one-class", "scalar"])
def test_fewer_than_two_classes(logits):
    _raises(lambda: loca_calibrate(logits, torch.zeros(logits.shape[:-1], dtype=torch.long)), "C >= 2")


# --------------------------------------------------------------------------- alpha, temperature
BAD_ALPHAS = [0.0, 1.0, -0.1, 1.5, -1.0, math.inf, math.nan]
ALPHA_USERS = {
    "loca_calibrate": lambda a: loca_calibrate(GOOD_T, GOOD_Y, alpha=a),
    "loca_log_calibrate": lambda a: loca_log_calibrate(GOOD_T, GOOD_Y, alpha=a),
    "kd_loss": lambda a: kd_loss(GOOD_S, GOOD_T, 4.0, GOOD_Y, loca_alpha=a),
    "kd_loss_transform": lambda a: kd_loss(
        GOOD_S, GOOD_T, 4.0, GOOD_Y, loca_alpha=a, target_transform="loca"
    ),
    "dkd_loss": lambda a: dkd_loss(GOOD_S, GOOD_T, GOOD_Y, loca_alpha=a),
    "token_distill_loss": lambda a: token_distill_loss(GOOD_S, GOOD_T, GOOD_Y, loca_alpha=a),
}


@pytest.mark.parametrize("name", ALPHA_USERS)
@pytest.mark.parametrize("alpha", BAD_ALPHAS, ids=str)
def test_alpha_outside_open_unit_interval(name, alpha):
    message = _raises(lambda: ALPHA_USERS[name](alpha), "alpha")
    if math.isnan(alpha):
        assert "nan" in message.lower()
    else:
        assert str(alpha) in message or repr(alpha) in message


@pytest.mark.parametrize("name", ALPHA_USERS)
@pytest.mark.parametrize("alpha", [1e-6, 0.5, 0.999999])
def test_alpha_inside_open_unit_interval_is_accepted(name, alpha):
    ALPHA_USERS[name](alpha)


@pytest.mark.parametrize("name", ALPHA_USERS)
@pytest.mark.parametrize("alpha", ["0.9", None], ids=["string", "none"])
def test_alpha_not_a_number(name, alpha):
    if alpha is None and not name.startswith("loca"):
        return  # loca_alpha=None means "no LoCa" for the losses
    _raises(lambda: ALPHA_USERS[name](alpha), "alpha")


TEMPERATURE_USERS = {
    "loca_calibrate": lambda t: loca_calibrate(GOOD_T, GOOD_Y, temperature=t),
    "loca_log_calibrate": lambda t: loca_log_calibrate(GOOD_T, GOOD_Y, temperature=t),
    "kd_loss": lambda t: kd_loss(GOOD_S, GOOD_T, t, GOOD_Y),
    "kd_loss_loca": lambda t: kd_loss(GOOD_S, GOOD_T, t, GOOD_Y, loca_alpha=0.9),
    "dkd_loss": lambda t: dkd_loss(GOOD_S, GOOD_T, GOOD_Y, temperature=t),
    "token_distill_loss": lambda t: token_distill_loss(GOOD_S, GOOD_T, GOOD_Y, temperature=t),
}


@pytest.mark.parametrize("name", TEMPERATURE_USERS)
@pytest.mark.parametrize("temperature", [0.0, -1.0, -4.0, math.nan, math.inf], ids=str)
def test_temperature_must_be_positive_and_finite(name, temperature):
    _raises(lambda: TEMPERATURE_USERS[name](temperature), "temperature")


# --------------------------------------------------------------------------- logits content and dtype
@pytest.mark.parametrize("name", PAIRED)
@pytest.mark.parametrize("which", ["student", "teacher"])
@pytest.mark.parametrize("bad", [math.nan, math.inf], ids=["nan", "inf"])
def test_nan_or_inf_in_logits(name, which, bad):
    s, t = GOOD_S.clone(), GOOD_T.clone()
    (s if which == "student" else t)[2, 3] = bad
    _raises(lambda: PAIRED[name](s, t, GOOD_Y), f"{which}_logits", "nan")


@pytest.mark.parametrize("name", ["loca_calibrate", "loca_log_calibrate", "misinstruction_mask"])
def test_nan_in_teacher_logits_for_calibration(name):
    t = GOOD_T.clone()
    t[0, 0] = math.nan
    _raises(lambda: LABELLED[name](GOOD_S, t, GOOD_Y), "teacher_logits", "nan")


@pytest.mark.parametrize("name", PAIRED)
@pytest.mark.parametrize("which", ["student", "teacher"])
@pytest.mark.parametrize("dtype", [torch.long, torch.int32, torch.bool])
def test_non_float_logits(name, which, dtype):
    s, t = GOOD_S, GOOD_T
    if which == "student":
        s = s.round().to(dtype)
    else:
        t = t.round().to(dtype)
    _raises(lambda: PAIRED[name](s, t, GOOD_Y), f"{which}_logits", "floating-point")


def test_logits_not_a_tensor():
    _raises(lambda: loca_calibrate(GOOD_T.tolist(), GOOD_Y), "teacher_logits", "tensor")


# --------------------------------------------------------------------------- options
@pytest.mark.parametrize(
    "fn",
    [
        lambda tr: kd_loss(GOOD_S, GOOD_T, 4.0, GOOD_Y, target_transform=tr),
        lambda tr: dkd_loss(GOOD_S, GOOD_T, GOOD_Y, target_transform=tr),
    ],
    ids=["kd", "dkd"],
)
def test_unknown_target_transform(fn):
    _raises(lambda: fn("loka"), "unknown target_transform", "'loka'", "ka_shift")


@pytest.mark.parametrize("chunk_size", [None, 2])
def test_unknown_divergence(chunk_size):
    _raises(
        lambda: token_distill_loss(GOOD_S, GOOD_T, GOOD_Y, "kl_forward", chunk_size=chunk_size),
        "unknown divergence",
        "'kl_forward'",
        "forward_kl",
    )


def test_loca_alpha_with_another_transform_is_rejected():
    _raises(
        lambda: kd_loss(GOOD_S, GOOD_T, 4.0, GOOD_Y, loca_alpha=0.9, target_transform="skip"),
        "loca_alpha",
        "skip",
    )


@pytest.mark.parametrize("transform", ["loca", "ka_shift", "ka_smooth", "skip"])
def test_transforms_need_labels(transform):
    _raises(lambda: kd_loss(GOOD_S, GOOD_T, 4.0, None, target_transform=transform), "needs labels")


def test_loca_alpha_needs_labels():
    _raises(lambda: kd_loss(GOOD_S, GOOD_T, 4.0, None, loca_alpha=0.9), "labels")


def test_dkd_needs_labels():
    _raises(lambda: dkd_loss(GOOD_S, GOOD_T, None), "labels")


@pytest.mark.parametrize(
    "name,value", [("alpha", -1.0), ("beta", -0.5), ("beta", math.nan), ("alpha", math.inf)]
)
def test_dkd_weights(name, value):
    _raises(lambda: dkd_loss(GOOD_S, GOOD_T, GOOD_Y, **{name: value}), name)


@pytest.mark.parametrize(
    "fn",
    [
        lambda r: kd_loss(GOOD_S, GOOD_T, 4.0, GOOD_Y, reduction=r),
        lambda r: dkd_loss(GOOD_S, GOOD_T, GOOD_Y, reduction=r),
        lambda r: token_distill_loss(GOOD_S, GOOD_T, GOOD_Y, reduction=r),
    ],
    ids=["kd", "dkd", "token"],
)
def test_unknown_reduction(fn):
    _raises(lambda: fn("average"), "reduction", "'average'")


def test_token_loss_has_no_per_row_reduction():
    _raises(lambda: token_distill_loss(GOOD_S, GOOD_T, GOOD_Y, reduction="none"), "reduction")


@pytest.mark.parametrize(
    "fn",
    [
        lambda n: kd_loss(GOOD_S, GOOD_T, 4.0, GOOD_Y, normalizer=n),
        lambda n: dkd_loss(GOOD_S, GOOD_T, GOOD_Y, normalizer=n),
        lambda n: token_distill_loss(GOOD_S, GOOD_T, GOOD_Y, normalizer=n),
    ],
    ids=["kd", "dkd", "token"],
)
@pytest.mark.parametrize("normalizer", [0, -3.0])
def test_normalizer_must_be_positive(fn, normalizer):
    _raises(lambda: fn(normalizer), "normalizer")


@pytest.mark.parametrize("chunk_size", [0, -2, 1.5])
def test_chunk_size_must_be_positive_integer(chunk_size):
    _raises(lambda: token_distill_loss(GOOD_S, GOOD_T, GOOD_Y, chunk_size=chunk_size), "chunk_size")


@pytest.mark.parametrize("name", ["jsd_beta", "skew_lambda"])
@pytest.mark.parametrize("value", [0.0, 1.0, -0.2, math.nan])
def test_mixing_weights_in_open_unit_interval(name, value):
    _raises(lambda: token_distill_loss(GOOD_S, GOOD_T, GOOD_Y, "jsd", **{name: value}), name)


@pytest.mark.parametrize("smoothing", [-0.1, 1.5])
def test_smoothing_in_unit_interval(smoothing):
    _raises(
        lambda: kd_loss(GOOD_S, GOOD_T, 4.0, GOOD_Y, target_transform="ka_smooth", smoothing=smoothing),
        "smoothing",
    )


def test_errors_are_raised_before_anything_is_computed_for_3d_inputs():
    """[B, T, V] inputs: a labels tensor flattened by mistake is caught, not broadcast."""
    s, t = torch.randn(2, 3, 5), torch.randn(2, 3, 5)
    flat = torch.zeros(6, dtype=torch.long)
    _raises(lambda: token_distill_loss(s, t, flat), "labels shape", "(6,)", "(2, 3)")
    _raises(lambda: kd_loss(s, t, 4.0, flat, loca_alpha=0.9), "labels shape")
