#!/usr/bin/env python
"""Speed and memory of locakd's losses next to the textbook formula and the libraries users would pick instead.

Every row times ``loss = f(inputs); loss.backward()`` (forward + backward, float32) of one
variant against its reference (the textbook formula, unless the row says otherwise) in ONE
process: after untimed warm-up calls, each repetition runs the reference and the variant
back to back, in an order that alternates (R V, V R, R V, ...), and the row reports the
median of the per-repetition ratios variant / reference with their interquartile range.
Pairing neighbouring runs cancels most of the load that other processes put on a shared
machine; the absolute medians are printed too.

Row groups (``--list`` prints every row name, ``--rows`` selects by glob):

- ``kd/*``: ``kd_loss`` (validation on / ``validate=False`` / + LoCa), ``dkd_loss`` (+ LoCa)
  against the textbook KD ``T^2 * F.kl_div(log_softmax(s/T), log_softmax(t/T), log_target=True,
  reduction="batchmean")`` and an mdistiller-style textbook DKD; torchdistill's ``KDLoss``;
  and the LoCa overhead (KD+LoCa vs KD, DKD+LoCa vs DKD, both given the labels).
- ``token/*``: ``token_distill_loss`` (every divergence; forward KL one shot and chunked, with
  and without LoCa; JSD one shot and chunked) against the textbook forward KL
  ``F.kl_div(log_softmax(s), log_softmax(t), log_target=True, reduction="sum") / tokens``;
  torchtune's ``ForwardKLLoss`` / ``ForwardKLWithChunkedOutputLoss`` and TRL's
  ``GKDTrainer.generalized_jsd_loss``.
- ``linear/*``: hidden states + lm_head -> forward KL: ``h @ W.T`` for both models then the
  textbook loss (the reference), then locakd's loss, ``locakd.linear_token_distill_loss`` when
  this build has it, and TRL's fused ``ChunkedDivergenceFunction``.

Peers are optional imports: a row whose library is missing reads "not importable here".

Memory: each variant (and each reference) also runs once in a FRESH subprocess. Its inputs are
built, the same loss runs once on tiny inputs (so libraries and thread pools are loaded), then
the kernel's peak-RSS counter is reset (``/proc/self/clear_refs``), the resident size is read,
one forward + backward runs and the peak resident size (VmHWM) is read. The difference is the
loss's peak extra memory; the gradient of the inputs, which every implementation must produce,
is part of it. glibc is told to serve every block over 128 KiB with mmap
(``MALLOC_MMAP_THRESHOLD_``) so freed blocks go back to the system and cannot hide an
allocation. Figures are also given in copies of one float32 ``[rows, classes]`` tensor.

Examples::

    python benchmarks/bench_losses.py                                 # everything, 1 and 2 threads
    python benchmarks/bench_losses.py --quick                         # tiny shapes: a smoke run
    python benchmarks/bench_losses.py --rows 'kd/*' --threads 1 --markdown kd.md
    python benchmarks/bench_losses.py --rows 'token/forward_kl+loca*' --token-shapes 8192x50257 \\
        --chunks 512 --memory-only                                    # the chunked-memory figure
    python benchmarks/bench_losses.py --rows 'kd/loca-overhead*' --threads 2   # LoCa's overhead
    python benchmarks/bench_losses.py --compile --rows 'token/forward_kl' # torch.compile twins

The exit status is 1 when a row failed or a value check disagreed (a variant that should equal
its reference did not, within float32 rounding), else 0. Speed is never asserted.
"""

from __future__ import annotations

import argparse
import datetime
import fnmatch
import gc
import json
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn.functional as F

import locakd

FLOAT32_EPS = torch.finfo(torch.float32).eps
IGNORE_INDEX = -100
KD_ALPHA, KD_BETA = 1.0, 8.0  # DKD weights (the recipe's defaults, also locakd's)
MIB = 2.0**20

DEFAULT_SHAPES = {
    "kd": [(8192, 100), (1024, 1000), (4096, 32000)],
    "token": [(2048, 32000), (2048, 50257)],
    "linear": [(2048, 768, 50257), (8192, 768, 50257)],
}
QUICK_SHAPES = {"kd": [(256, 10), (64, 100)], "token": [(64, 500)], "linear": [(64, 32, 500)]}
GROUP_TITLES = {
    "kd": "Image KD: `kd_loss`, `dkd_loss` (T = {T}, LoCa alpha {alpha}, ~{mis:.0%} mis-instructed rows)",
    "token": "Token-level divergences: `token_distill_loss` (T = 1, LoCa alpha {alpha}, ~{mis:.0%} "
    "mis-instructed rows, {ignore:.0%} ignored rows), shape [tokens, V]",
    "linear": "Hidden states + lm_head -> forward KL (T = 1, {ignore:.0%} ignored rows), shape [tokens, hidden, V]",
}


class Unavailable(Exception):
    """A row whose implementation cannot run here (a peer that is not installed, an API this build lacks)."""


@dataclass(frozen=True)
class Config:
    temperature: float = 4.0
    alpha: float = 0.9
    mis_rate: float = 0.3
    ignore_fraction: float = 0.0
    seed: int = 0
    chunks: tuple[int, ...] = (512, 1024)


@dataclass
class Inputs:
    """One group's tensors at one shape, and the magnitudes the value checks scale with."""

    group: str
    shape: tuple[int, ...]
    labels: torch.Tensor
    student: torch.Tensor | None = None  # [N, C] logits (kd, token); a leaf that requires grad
    teacher: torch.Tensor | None = None
    hidden_s: torch.Tensor | None = None  # linear: [N, d] and [V, d] leaves, teacher ones without grad
    weight_s: torch.Tensor | None = None
    hidden_t: torch.Tensor | None = None
    weight_t: torch.Tensor | None = None
    valid_index: torch.Tensor | None = None  # rows whose label is not ignored; None when all are valid
    logit_bound: float = 1.0  # max |logit| / T + log(classes): the size of a log-probability
    teacher_entropy: float = 0.0  # mean over valid rows (torchtune returns cross-entropy, not KL)

    @property
    def leaves(self) -> tuple[torch.Tensor, ...]:
        if self.group == "linear":
            return (self.hidden_s, self.weight_s)
        return (self.student,)

    @property
    def rows(self) -> int:
        return self.shape[0]

    @property
    def valid_rows(self) -> int:
        return self.rows if self.valid_index is None else int(self.valid_index.numel())

    @property
    def one_copy_mib(self) -> float:
        """Size of one float32 [rows, classes] tensor."""
        return self.shape[0] * self.shape[-1] * 4 / MIB


LossFn = Callable[[Inputs], torch.Tensor]


@dataclass(frozen=True)
class Variant:
    """A loss to time: a row's variant or a reference. ``build`` may raise :class:`Unavailable`."""

    name: str
    label: str
    build: Callable[[Config], LossFn]
    reference: str | None = None  # name of the reference this row is paired with (None: it is one)
    expect: str | None = None  # "equal": same value as the reference; "plus_entropy": + teacher entropy
    compilable: bool = False  # locakd or textbook code that --compile may wrap


# ----------------------------------------------------------------------------------------- inputs


def _logits_with_misinstruction(rows: int, classes: int, mis_rate: float, gen: torch.Generator):
    """Teacher logits and labels where ~mis_rate of the rows have a top-1 that is not the label."""
    teacher = torch.randn(rows, classes, generator=gen) * 2.0
    labels = torch.randint(0, classes, (rows,), generator=gen)
    top_value, top_index = teacher.max(dim=-1)
    mis = torch.rand(rows, generator=gen) < mis_rate
    # a mis-instructed row keeps its label 0.5-1.5 below the top logit; a right one puts it 0.5-1.5 above
    margin = 0.5 + torch.rand(rows, generator=gen)
    label_value = torch.where(mis, top_value - margin, top_value + margin)
    labels = torch.where(mis & (labels == top_index), (labels + 1) % classes, labels)
    teacher.scatter_(1, labels.unsqueeze(1), label_value.unsqueeze(1))
    return teacher, labels


def _ignore_rows(labels: torch.Tensor, fraction: float) -> torch.Tensor | None:
    """Mark the first ``fraction`` of the rows as ignored (prompt positions); their valid index or None."""
    count = int(round(fraction * labels.numel()))
    if count == 0:
        return None
    labels[:count] = IGNORE_INDEX
    return (labels != IGNORE_INDEX).nonzero().squeeze(1)


def _entropy(logits: torch.Tensor) -> float:
    log_p = torch.log_softmax(logits.double(), dim=-1)
    return float(-(log_p.exp() * log_p).sum(-1).mean())


def make_inputs(group: str, shape: tuple[int, ...], cfg: Config) -> Inputs:
    gen = torch.Generator().manual_seed(cfg.seed)
    if group in ("kd", "token"):
        rows, classes = shape
        teacher, labels = _logits_with_misinstruction(rows, classes, cfg.mis_rate, gen)
        student = (torch.randn(rows, classes, generator=gen) * 2.0).requires_grad_(True)
        temperature = cfg.temperature if group == "kd" else 1.0
        bound = max(float(student.detach().abs().amax()), float(teacher.abs().amax())) / temperature
        inputs = Inputs(group, shape, labels, student=student, teacher=teacher,
                        logit_bound=bound + math.log(classes))
        if group == "token":
            inputs.valid_index = _ignore_rows(labels, cfg.ignore_fraction)
            valid_teacher = teacher if inputs.valid_index is None else teacher[inputs.valid_index]
            inputs.teacher_entropy = _entropy(valid_teacher)
        return inputs
    if group == "linear":
        rows, hidden, vocab = shape
        scale = 2.0 / math.sqrt(hidden)  # logits ~ N(0, 2^2), as in the other groups
        hidden_s = torch.randn(rows, hidden, generator=gen).requires_grad_(True)
        weight_s = (torch.randn(vocab, hidden, generator=gen) * scale).requires_grad_(True)
        hidden_t = torch.randn(rows, hidden, generator=gen)
        weight_t = torch.randn(vocab, hidden, generator=gen) * scale
        labels = torch.randint(0, vocab, (rows,), generator=gen)
        with torch.no_grad():  # the logit size from a sample of rows (the full logits may not fit twice)
            sample = slice(0, min(rows, 256))
            top = max(float((hidden_s[sample] @ weight_s.T).abs().amax()),
                      float((hidden_t[sample] @ weight_t.T).abs().amax()))
            inputs = Inputs(group, shape, labels, hidden_s=hidden_s, weight_s=weight_s, hidden_t=hidden_t,
                            weight_t=weight_t, logit_bound=1.25 * top + math.log(vocab))
            inputs.valid_index = _ignore_rows(labels, cfg.ignore_fraction)
        return inputs
    raise ValueError(f"unknown group {group!r}")


# ------------------------------------------------------------------------------- textbook formulas


def textbook_kd(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """Hinton KD: T^2 * KL(softmax(t/T) || softmax(s/T)), mean over rows."""
    return F.kl_div(
        F.log_softmax(student / temperature, dim=-1),
        F.log_softmax(teacher / temperature, dim=-1),
        log_target=True,
        reduction="batchmean",
    ) * (temperature * temperature)


def textbook_dkd(student, teacher, labels, temperature, alpha=KD_ALPHA, beta=KD_BETA) -> torch.Tensor:
    """Decoupled KD as mdistiller writes it (Zhao et al. 2022), mean over rows.

    TCKD: KL of the binary [p_gt, 1 - p_gt] distributions, each built by summing the softmax
    over the label mask and over the rest; NCKD: KL of the softmaxes with the label logit
    pushed down by 1000 (so its probability underflows to 0).
    """
    rows = student.shape[0]
    gt_mask = torch.zeros_like(student, dtype=torch.bool).scatter_(1, labels.unsqueeze(1), True)
    p_student = F.softmax(student / temperature, dim=1)
    p_teacher = F.softmax(teacher / temperature, dim=1)

    def target_vs_rest(p):
        return torch.cat([(p * gt_mask).sum(1, keepdim=True), (p * ~gt_mask).sum(1, keepdim=True)], dim=1)

    tckd = F.kl_div(torch.log(target_vs_rest(p_student)), target_vs_rest(p_teacher), reduction="sum")
    push_down = 1000.0 * gt_mask
    nckd = F.kl_div(
        F.log_softmax(student / temperature - push_down, dim=1),
        F.softmax(teacher / temperature - push_down, dim=1),
        reduction="sum",
    )
    return (alpha * tckd + beta * nckd) * (temperature * temperature) / rows


def textbook_forward_kl(student: torch.Tensor, teacher: torch.Tensor, x: Inputs) -> torch.Tensor:
    """KL(softmax(t) || softmax(s)) summed over the valid rows, divided by their count."""
    if x.valid_index is not None:
        student, teacher = student.index_select(0, x.valid_index), teacher.index_select(0, x.valid_index)
    loss = F.kl_div(F.log_softmax(student, dim=-1), F.log_softmax(teacher, dim=-1), log_target=True,
                    reduction="sum")
    return loss / max(x.valid_rows, 1)


def project(x: Inputs) -> tuple[torch.Tensor, torch.Tensor]:
    """Both models' logits ``h @ W.T`` (the teacher's without autograd)."""
    student = x.hidden_s @ x.weight_s.T
    with torch.no_grad():
        teacher = x.hidden_t @ x.weight_t.T
    return student, teacher


# ------------------------------------------------------------------------------------------- rows


def _import_peer(module: str, name: str):
    try:
        return getattr(__import__(module, fromlist=[name]), name)
    except Exception as exc:  # ImportError, or a broken dependency of the peer (e.g. torchvision)
        raise Unavailable(f"not importable here ({type(exc).__name__}: {str(exc).splitlines()[0][:120]})") from exc


def kd_variants(cfg: Config) -> list[Variant]:
    T, alpha = cfg.temperature, cfg.alpha
    kd, dkd = locakd.kd_loss, locakd.dkd_loss

    def torchdistill_kd(_cfg):
        kd_module = _import_peer("torchdistill.losses.mid_level", "KDLoss")
        # alpha=0: the soft-target term only; torchdistill returns it without the T^2 factor
        loss = kd_module("logits", "output", "logits", "output", temperature=T, alpha=0.0)
        return lambda x: loss({"logits": {"output": x.student}}, {"logits": {"output": x.teacher}}) * (T * T)

    return [
        Variant("kd/textbook-kd", "textbook KD", lambda c: lambda x: textbook_kd(x.student, x.teacher, T),
                compilable=True),
        Variant("kd/textbook-dkd", "textbook DKD (mdistiller-style)",
                lambda c: lambda x: textbook_dkd(x.student, x.teacher, x.labels, T), compilable=True),
        Variant("kd/kd_loss-labels", "`kd_loss` (labels given)",
                lambda c: lambda x: kd(x.student, x.teacher, T, x.labels)),
        Variant("kd/kd_loss", "`kd_loss` (plain KD, validation on)",
                lambda c: lambda x: kd(x.student, x.teacher, T), "kd/textbook-kd", "equal", True),
        Variant("kd/kd_loss-no-validate", "`kd_loss`, `validate=False`",
                lambda c: lambda x: kd(x.student, x.teacher, T, validate=False), "kd/textbook-kd", "equal", True),
        Variant("kd/kd_loss+loca", "`kd_loss` + LoCa",
                lambda c: lambda x: kd(x.student, x.teacher, T, x.labels, loca_alpha=alpha),
                "kd/textbook-kd", None, True),
        Variant("kd/dkd_loss", "`dkd_loss`",
                lambda c: lambda x: dkd(x.student, x.teacher, x.labels, temperature=T),
                "kd/textbook-dkd", "equal", True),
        Variant("kd/dkd_loss+loca", "`dkd_loss` + LoCa",
                lambda c: lambda x: dkd(x.student, x.teacher, x.labels, temperature=T, loca_alpha=alpha),
                "kd/textbook-dkd", None, True),
        Variant("kd/torchdistill-KDLoss", "torchdistill `KDLoss` (x T^2)", torchdistill_kd,
                "kd/textbook-kd", "equal"),
        Variant("kd/loca-overhead-kd", "LoCa overhead: `kd_loss` + LoCa vs `kd_loss` (labels given)",
                lambda c: lambda x: kd(x.student, x.teacher, T, x.labels, loca_alpha=alpha), "kd/kd_loss-labels"),
        Variant("kd/loca-overhead-dkd", "LoCa overhead: `dkd_loss` + LoCa vs `dkd_loss`",
                lambda c: lambda x: dkd(x.student, x.teacher, x.labels, temperature=T, loca_alpha=alpha),
                "kd/dkd_loss"),
    ]


def _token(divergence: str, chunk: int | None = None, loca: float | None = None):
    def build(_cfg):
        return lambda x: locakd.token_distill_loss(x.student, x.teacher, x.labels, divergence, loca_alpha=loca,
                                                   chunk_size=chunk)
    return build


def token_variants(cfg: Config) -> list[Variant]:
    ref = "token/textbook-forward_kl"
    last = cfg.chunks[-1]
    rows = [Variant(ref, "textbook forward KL",
                    lambda c: lambda x: textbook_forward_kl(x.student, x.teacher, x), compilable=True),
            Variant("token/forward_kl", "forward KL, one shot", _token("forward_kl"), ref, "equal", True)]
    rows += [Variant(f"token/forward_kl-chunk{n}", f"forward KL, `chunk_size={n}`", _token("forward_kl", n),
                     ref, "equal", True) for n in cfg.chunks]
    rows += [
        Variant("token/forward_kl+loca", "forward KL + LoCa, one shot", _token("forward_kl", None, cfg.alpha),
                ref, None, True),
        Variant(f"token/forward_kl+loca-chunk{last}", f"forward KL + LoCa, `chunk_size={last}`",
                _token("forward_kl", last, cfg.alpha), ref, None, True),
        Variant("token/jsd", "JSD (beta 0.5), one shot", _token("jsd"), ref, None, True),
        Variant(f"token/jsd-chunk{last}", f"JSD (beta 0.5), `chunk_size={last}`", _token("jsd", last), ref, None,
                True),
    ]
    rows += [Variant(f"token/{name}", f"{name}, one shot", _token(name), ref, None, True)
             for name in ("reverse_kl", "skew_forward_kl", "skew_reverse_kl", "total_variation")]

    def torchtune_one_shot(_cfg):
        loss = _import_peer("torchtune.modules.loss", "ForwardKLLoss")(ignore_index=IGNORE_INDEX)
        return lambda x: loss(x.student, x.teacher, x.labels)

    def torchtune_chunked(_cfg):
        loss = _import_peer("torchtune.modules.loss", "ForwardKLWithChunkedOutputLoss")(
            num_output_chunks=8, ignore_index=IGNORE_INDEX)

        def run(x):  # torchtune takes [batch, tokens, V] chunks along the tokens
            student = list(x.student.unsqueeze(0).chunk(8, dim=1))
            teacher = list(x.teacher.unsqueeze(0).chunk(8, dim=1))
            return loss(student, teacher, x.labels.unsqueeze(0))
        return run

    def trl_gjsd(beta: float):
        def build(_cfg):
            os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
            trainer = _import_peer("trl.experimental.gkd", "GKDTrainer")
            return lambda x: trainer.generalized_jsd_loss(x.student, x.teacher, x.labels, beta=beta)
        return build

    rows += [
        Variant("token/torchtune-ForwardKLLoss", "torchtune `ForwardKLLoss` (returns cross-entropy)",
                torchtune_one_shot, ref, "plus_entropy"),
        Variant("token/torchtune-ForwardKLWithChunkedOutputLoss",
                "torchtune `ForwardKLWithChunkedOutputLoss` (8 chunks)", torchtune_chunked, ref, "plus_entropy"),
        Variant("token/trl-generalized_jsd-beta0", "TRL `generalized_jsd_loss`, beta 0 (forward KL)",
                trl_gjsd(0.0), ref, "equal"),
        Variant("token/trl-generalized_jsd-beta0.5", "TRL `generalized_jsd_loss`, beta 0.5 (JSD)",
                trl_gjsd(0.5), ref, None),
    ]
    return rows


def linear_variants(cfg: Config) -> list[Variant]:
    ref = "linear/unfused-textbook"
    chunk = cfg.chunks[-1]

    def unfused_locakd(_cfg):
        def run(x):
            student, teacher = project(x)
            return locakd.token_distill_loss(student, teacher, x.labels, "forward_kl", chunk_size=chunk)
        return run

    def fused_locakd(_cfg):
        fused = getattr(locakd, "linear_token_distill_loss", None)
        if fused is None:
            raise Unavailable("not available in this build (no `locakd.linear_token_distill_loss`)")
        return lambda x: fused(x.hidden_s, x.weight_s, x.hidden_t, x.weight_t, x.labels, "forward_kl",
                               chunk_size=chunk)

    def trl_fused(_cfg):
        function = _import_peer("trl.kernels.chunked_divergence", "ChunkedDivergenceFunction")

        def run(x):  # beta 0 = forward KL; per-token values, masked and averaged as TRL's trainer does
            per_token, _entropy_ = function.apply(x.hidden_s, x.weight_s, None, x.hidden_t, x.weight_t, None,
                                                  0.0, 1.0, 1.0, None, 1.0, None)
            if x.valid_index is not None:
                per_token = per_token.masked_fill(x.labels == IGNORE_INDEX, 0.0)
            return per_token.sum() / max(x.valid_rows, 1)
        return run

    return [
        Variant(ref, "`h @ W.T` (both models), then textbook forward KL",
                lambda c: lambda x: textbook_forward_kl(*project(x), x), compilable=True),
        Variant("linear/unfused-locakd", f"`h @ W.T`, then `token_distill_loss` (`chunk_size={chunk}`)",
                unfused_locakd, ref, "equal", True),
        Variant("linear/locakd-fused", f"`locakd.linear_token_distill_loss` (`chunk_size={chunk}`)",
                fused_locakd, ref, "equal", True),
        Variant("linear/trl-ChunkedDivergence", "TRL fused `ChunkedDivergenceFunction` (beta 0)",
                trl_fused, ref, "equal"),
    ]


VARIANTS_BY_GROUP = {"kd": kd_variants, "token": token_variants, "linear": linear_variants}


def compiled(variant: Variant) -> Variant:
    """A twin of ``variant`` whose loss runs under ``torch.compile`` (paired with the same, eager, reference)."""

    def build(cfg):
        return torch.compile(variant.build(cfg), dynamic=False)

    if variant.reference is None:  # a compiled reference is timed against its eager self
        reference, expect = variant.name, "equal"
    else:
        reference, expect = variant.reference, variant.expect
    return replace(variant, name=variant.name + "@compile", label=variant.label + " [torch.compile]",
                   build=build, reference=reference, expect=expect, compilable=False)


def all_variants(cfg: Config, with_compile: bool) -> dict[str, list[Variant]]:
    groups = {}
    for group, make in VARIANTS_BY_GROUP.items():
        variants = make(cfg)
        if with_compile:
            variants += [compiled(v) for v in variants if v.compilable]
        groups[group] = variants
    return groups


# ------------------------------------------------------------------------------------------ timing

CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
CLOCK_TEXT = {"wall": "wall time (`time.perf_counter`)",
              "cpu": "CPU time of the process (`time.process_time`; blind to time lost to other processes)"}


def run_once(fn: LossFn, x: Inputs, clock) -> tuple[float, torch.Tensor]:
    for leaf in x.leaves:
        leaf.grad = None
    start = clock()
    loss = fn(x)
    loss.backward()
    return clock() - start, loss.detach()


def _grads(x: Inputs) -> list[torch.Tensor]:
    return [leaf.grad.detach().clone() for leaf in x.leaves]


def value_check(expect: str | None, x: Inputs, ref_value, var_value, ref_grads, var_grads, value_scale) -> dict:
    """Whether a variant that should compute the reference's loss does so, within float32 rounding.

    Each log-probability carries an absolute rounding error of a few eps times its size,
    ``x.logit_bound`` (max |logit| / T + log C), and a loss is a probability-weighted sum of
    them, so values may differ by about eps * logit_bound * value_scale (32 of them here:
    different summation orders). Gradients are compared by norm, relative to the reference's:
    each entry carries the same relative error, and where a matrix product sums K terms (the
    linear group) the error grows like sqrt(K). The check catches wiring mistakes (a missing
    factor, a wrong sign, a dropped term), which are O(1), not last-bit differences.
    """
    if expect is None:
        return {"value_check": "not compared (a different loss)"}
    expected = float(ref_value) + (x.teacher_entropy if expect == "plus_entropy" else 0.0)
    value_tol = 32 * FLOAT32_EPS * (x.logit_bound * value_scale + abs(expected))
    value_diff = abs(float(var_value) - expected)
    inner = max(x.shape[0], x.shape[-1]) if x.group == "linear" else 1
    grad_tol = 64 * FLOAT32_EPS * x.logit_bound * math.sqrt(inner)
    grad_diff = max(float((v - r).norm() / r.norm().clamp(min=1e-30)) for r, v in zip(ref_grads, var_grads,
                                                                                     strict=True))
    ok = value_diff <= value_tol and grad_diff <= grad_tol
    return {"value_check": "ok" if ok else "MISMATCH", "value_diff": value_diff, "value_tol": value_tol,
            "grad_rel_diff": grad_diff, "grad_tol": grad_tol}


def _value_scale(group: str, reference: str, cfg: Config) -> float:
    if group != "kd":
        return 1.0
    return cfg.temperature**2 * ((KD_ALPHA + KD_BETA) if "dkd" in reference else 1.0)


def quartiles(values: list[float]) -> tuple[float, float]:
    if len(values) < 2:
        return values[0], values[0]
    q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, q3


def time_pair(ref_fn: LossFn, var_fn: LossFn, x: Inputs, args, expect: str | None, value_scale: float) -> dict:
    """Interleaved, paired timing of one row; the first (untimed) round also checks the values."""
    clock = CLOCKS[args.clock]
    _, ref_value = run_once(ref_fn, x, clock)
    ref_grads = _grads(x) if expect else []
    _, var_value = run_once(var_fn, x, clock)
    check = value_check(expect, x, ref_value, var_value, ref_grads, _grads(x) if expect else [], value_scale)
    del ref_grads
    for _ in range(args.warmup - 1):
        run_once(ref_fn, x, clock)
        run_once(var_fn, x, clock)
    ref_times, var_times = [], []
    started = time.perf_counter()
    gc.disable()  # no collector pauses inside a timed call (the caller collects between shapes)
    try:
        for rep in range(args.repeats):
            order = ((ref_fn, ref_times), (var_fn, var_times))
            for fn, times in order if rep % 2 == 0 else order[::-1]:
                times.append(run_once(fn, x, clock)[0])
            if rep + 1 >= args.min_repeats and time.perf_counter() - started > args.row_seconds:
                break
    finally:
        gc.enable()
    ratios = [v / r for v, r in zip(var_times, ref_times, strict=True)]
    q1, q3 = quartiles(ratios)
    return {"status": "ok", "n": len(ratios), "ratio_median": statistics.median(ratios), "ratio_q1": q1,
            "ratio_q3": q3, "ratio_min": min(ratios), "ratio_max": max(ratios),
            "var_median_ms": 1e3 * statistics.median(var_times), "ref_median_ms": 1e3 * statistics.median(ref_times),
            "ratios": ratios, "ref_value": float(ref_value), "var_value": float(var_value), **check}


def profile_variant(fn: LossFn, x: Inputs, label: str, top: int = 12) -> None:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run_once(fn, x, time.perf_counter)
    print(f"\nprofile of {label} at {list(x.shape)} (one forward + backward, self CPU time):")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=top))


# ------------------------------------------------------------------------------------------ memory


def _proc_status_kib(key: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{key} not in /proc/self/status")


def _reset_peak_rss() -> None:
    with open("/proc/self/clear_refs", "w") as fh:  # Linux >= 4.0: "5" resets VmHWM to the current RSS
        fh.write("5")


def memory_worker(spec: dict) -> dict:
    """Run in a fresh process: peak extra resident memory of one forward + backward of one variant."""
    cfg = Config(**{**spec["cfg"], "chunks": tuple(spec["cfg"]["chunks"])})
    group, shape = spec["group"], tuple(spec["shape"])
    torch.set_num_threads(spec["threads"])
    variant = {v.name: v for v in all_variants(cfg, with_compile=False)[group]}[spec["name"]]
    fn = variant.build(cfg)
    x = make_inputs(group, shape, cfg)
    tiny = make_inputs(group, QUICK_SHAPES[group][-1], cfg)
    run_once(fn, tiny, time.perf_counter)  # loads libraries, kernels and thread pools
    del tiny
    for leaf in x.leaves:
        leaf.grad = None
    gc.collect()
    _reset_peak_rss()
    baseline = _proc_status_kib("VmRSS")
    seconds, loss = run_once(fn, x, time.perf_counter)
    peak = _proc_status_kib("VmHWM")
    return {"baseline_mib": baseline / 1024, "peak_mib": peak / 1024, "extra_mib": (peak - baseline) / 1024,
            "copies": (peak - baseline) / 1024 / x.one_copy_mib, "seconds": seconds, "loss": float(loss)}


def measure_memory(group: str, shape, name: str, cfg: Config, threads: int) -> dict:
    spec = {"group": group, "shape": list(shape), "name": name, "cfg": asdict(cfg), "threads": threads}
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072", TRL_EXPERIMENTAL_SILENCE="1")
    src = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH")) if p)
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--memory-worker", json.dumps(spec)],
                          capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1][:200]
        return {"status": f"error: memory run exited {proc.returncode}: {tail}"}
    return {"status": "ok", **json.loads(proc.stdout.strip().splitlines()[-1])}


# ----------------------------------------------------------------------------------------- report


def machine_info() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next(line.split(":", 1)[1].strip() for line in fh if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    memory_gib = None
    try:
        with open("/proc/meminfo") as fh:
            memory_gib = int(next(line for line in fh if line.startswith("MemTotal")).split()[1]) / 2**20
    except (OSError, StopIteration):
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": memory_gib,
        "torch": torch.__version__,
        "mkl": torch.backends.mkl.is_available(),
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "load_average": os.getloadavg(),
    }


def shape_text(shape) -> str:
    return "[" + ", ".join(str(s) for s in shape) + "]"


def ratio_cell(result: dict | None) -> str:
    if not result:
        return "—"
    if result.get("status") != "ok":
        return result.get("status", "—")
    return f"{result['ratio_median']:.2f} ({result['ratio_q1']:.2f}–{result['ratio_q3']:.2f}, n={result['n']})"


def memory_cell(row: dict, refs: dict) -> str:
    mem, ref = row.get("memory"), refs.get((row["group"], tuple(row["shape"]), row["reference"]))
    if not mem:
        return "—"
    if mem.get("status") != "ok":
        return mem["status"]
    text = f"{mib_text(mem['extra_mib'])} MiB ({mem['copies']:.2f})"
    if ref and ref.get("status") == "ok":
        text += f" / {mib_text(ref['extra_mib'])} ({ref['copies']:.2f})"
    return text


def ms_text(ms: float) -> str:
    return f"{ms:.0f}" if ms >= 100 else f"{ms:.1f}" if ms >= 10 else f"{ms:.2f}"


def mib_text(mib: float) -> str:
    return f"{mib:.0f}" if abs(mib) >= 100 else f"{mib:.1f}"


def merge_reports(reports: list[dict]) -> dict:
    """One report from several runs (e.g. a 1-thread and a 2-thread one): rows joined by name and shape."""
    rows: dict[tuple, dict] = {}
    reference_memory: dict[tuple, dict] = {}
    threads: list[int] = []
    for report in reports:
        threads += [t for t in report["config"]["threads"] if t not in threads]
        for row in report["rows"]:
            merged = rows.setdefault((row["name"], tuple(row["shape"])), {**row, "results": {}})
            for key, result in row["results"].items():
                merged["results"].setdefault(key, result)
            if not merged.get("memory") and row.get("memory"):
                merged["memory"] = row["memory"]
        for mem in report["reference_memory"]:
            reference_memory.setdefault((mem["group"], tuple(mem["shape"]), mem["name"]), mem)
    return {"runs": reports, "threads": sorted(threads), "rows": list(rows.values()),
            "reference_memory": reference_memory}


def markdown_report(reports: list[dict]) -> str:
    """The paste-ready BENCHMARKS.md section of one or several runs (their rows side by side)."""
    merged = merge_reports(reports)
    threads, cfg = merged["threads"], reports[0]["config"]
    lines = ["## Loss speed (forward + backward, float32, CPU)", "", "```bash"]
    lines += [report["command"] for report in reports] + ["```", ""]
    for report in reports:
        m, run = report["machine"], report["config"]
        lines.append(
            f"- threads {','.join(map(str, run['threads']))}: {m['cpu']} ({m['cores']} cores visible, "
            f"{m['memory_gib']:.0f} GiB), torch {m['torch']}, Python {m['python']}; {m['date']}; load average "
            f"{m['load_average'][0]:.1f} at the start, {report['load_average_end'][0]:.1f} at the end; clock: "
            f"{CLOCK_TEXT.get(run['clock'], run['clock'])}; {run['min_repeats']}-{run['repeats']} pairs per row "
            f"(a row stops adding pairs after {run['row_seconds']:g} s), {run['warmup']} untimed round(s) first."
        )
    lines += [
        "",
        "Each cell: median over repetitions of the paired ratio time(variant) / time(reference), "
        "interquartile range and the number of pairs n in brackets; below 1 is faster than the reference. "
        "Reference and variant run back to back, in alternating order. "
        f"ms: median times of variant / reference at {threads[0]} thread(s). Memory: peak extra resident "
        "memory of one forward + backward in a fresh process, variant / reference, with the number of "
        "float32 [rows, classes] copies in brackets (the input gradient is one of them); \"same value\": "
        "the variant's loss and gradient equal the reference's within float32 rounding.",
    ]
    for group in ("kd", "token", "linear"):
        rows = [r for r in merged["rows"] if r["group"] == group]
        if not rows:
            continue
        title = GROUP_TITLES[group].format(T=cfg["temperature"], alpha=cfg["alpha"], mis=cfg["mis_rate"],
                                           ignore=cfg["ignore_fraction"])
        lines += ["", f"### {title}", ""]
        header = ["loss", "shape", "reference"] + [f"{t} thread{'s' * (t > 1)}" for t in threads]
        header += [f"ms ({threads[0]} thr.)", "peak extra memory", "notes"]
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for row in rows:
            by_thread = row["results"]
            first = by_thread.get(str(threads[0])) or {}
            ms = (f"{ms_text(first['var_median_ms'])} / {ms_text(first['ref_median_ms'])}"
                  if first.get("status") == "ok" else "—")
            notes = [row["status"]] if row["status"] != "ok" else []
            checks = {r.get("value_check") for r in by_thread.values() if r.get("value_check")}
            if "MISMATCH" in checks:
                notes.append("VALUE MISMATCH (see JSON)")
            elif checks == {"ok"}:
                notes.append("same value")
            cells = [row["label"], shape_text(row["shape"]), row["reference_label"]]
            cells += [ratio_cell(by_thread.get(str(t))) for t in threads]
            cells += [ms, memory_cell(row, merged["reference_memory"]), "; ".join(notes)]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------- main


def parse_shapes(text: str, dims: int) -> list[tuple[int, ...]]:
    shapes = []
    for item in text.split(","):
        try:
            shape = tuple(int(v) for v in item.lower().strip().split("x"))
        except ValueError:
            shape = ()
        if len(shape) != dims or min(shape) < 1:
            raise argparse.ArgumentTypeError(f"a shape here is {dims} positive integers joined by 'x', got {item!r}")
        shapes.append(shape)
    return shapes


def parse_ints(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from exc
    if min(values) < 1:
        raise argparse.ArgumentTypeError(f"values must be >= 1, got {text!r}")
    return values


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0] + " See the module docstring for the method.",
        epilog=__doc__.split("Examples::")[1].split("The exit status")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--threads", type=parse_ints, default=[1, 2],
                        help="comma-separated torch thread counts; every row is timed at each (default 1,2)")
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed pairs per row at most (default 101; --quick: 5)")
    parser.add_argument("--min-repeats", type=int, default=3,
                        help="timed pairs per row at least, whatever --row-seconds says (default 3)")
    parser.add_argument("--row-seconds", type=float, default=None,
                        help="stop adding pairs to a row once it has --min-repeats and ran this long, so fast rows "
                        "get many pairs and slow ones few (default 20; --quick: 1)")
    parser.add_argument("--warmup", type=int, default=1,
                        help="untimed rounds (reference + variant) before timing, at least 1: the first also "
                        "checks that the values agree (default 1)")
    parser.add_argument("--rows", default="*",
                        help="comma-separated glob patterns over row names, e.g. 'kd/*,token/forward_kl*' "
                        "(default: all; --list shows the names)")
    parser.add_argument("--list", action="store_true", help="print the row names and exit")
    parser.add_argument("--quick", action="store_true",
                        help="tiny shapes and chunk sizes 16,32 (a smoke run of every row in seconds)")
    parser.add_argument("--kd-shapes", type=lambda s: parse_shapes(s, 2), metavar="ROWSxCLASSES,...",
                        help="shapes of the kd group (default 8192x100,1024x1000,4096x32000)")
    parser.add_argument("--token-shapes", type=lambda s: parse_shapes(s, 2), metavar="TOKENSxV,...",
                        help="shapes of the token group (default 2048x32000,2048x50257)")
    parser.add_argument("--linear-shapes", type=lambda s: parse_shapes(s, 3), metavar="TOKENSxHIDDENxV,...",
                        help="shapes of the linear group (default 2048x768x50257,8192x768x50257)")
    parser.add_argument("--chunks", type=parse_ints,
                        help="chunk sizes of the chunked forward KL rows; LoCa, JSD and the linear rows use the "
                        "last one (default 512,1024; --quick: 16,32)")
    parser.add_argument("--temperature", type=float, default=4.0, help="T of the kd group (token rows use 1)")
    parser.add_argument("--alpha", type=float, default=0.9, help="LoCa alpha")
    parser.add_argument("--mis-rate", type=float, default=0.3,
                        help="fraction of rows whose teacher top-1 is not the label (kd and token groups)")
    parser.add_argument("--ignore-fraction", type=float, default=0.0,
                        help="fraction of token rows labelled -100 (prompt positions) in the token and linear "
                        "groups; the textbook formula then selects the valid rows first (default 0)")
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                        help="wall: time.perf_counter; cpu: CPU time of this process (at 1 thread it ignores "
                        "time lost to other processes on a busy machine)")
    parser.add_argument("--compile", action="store_true",
                        help="also time torch.compile twins of the locakd and textbook losses (each against the "
                        "eager reference; a compiled reference against its eager self)")
    parser.add_argument("--no-memory", action="store_true", help="skip the fresh-process memory measurements")
    parser.add_argument("--memory-only", action="store_true", help="skip the timings, measure memory only")
    parser.add_argument("--memory-threads", type=int, default=None,
                        help="torch threads of the memory processes (default: the largest of --threads)")
    parser.add_argument("--profile", action="store_true",
                        help="also print torch.profiler's top operators of each variant (first thread count)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the generated inputs")
    parser.add_argument("--json", metavar="OUT", help="write every measurement (per-pair ratios included) here")
    parser.add_argument("--markdown", metavar="OUT", help="write a paste-ready BENCHMARKS.md section here")
    parser.add_argument("--render", metavar="JSON", nargs="+",
                        help="measure nothing: print the markdown section of --json files written earlier (several "
                        "runs, e.g. one per thread count, become one table)")
    parser.add_argument("--memory-worker", help=argparse.SUPPRESS)
    return parser


def select(groups: dict[str, list[Variant]], patterns: list[str]) -> list[Variant]:
    chosen = []
    for variants in groups.values():
        chosen += [v for v in variants if v.reference and any(fnmatch.fnmatchcase(v.name, p) for p in patterns)]
    return chosen


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.memory_worker:
        print(json.dumps(memory_worker(json.loads(args.memory_worker))))
        return 0
    if args.render:
        reports = []
        for path in args.render:
            with open(path) as fh:
                reports.append(json.load(fh))
        print(markdown_report(reports), end="")
        return 0
    if args.repeats is None:
        args.repeats = 5 if args.quick else 101
    if args.row_seconds is None:
        args.row_seconds = 1.0 if args.quick else 20.0
    if args.repeats < 1 or args.min_repeats < 1 or args.warmup < 1:
        raise SystemExit("--repeats, --min-repeats and --warmup must be >= 1")
    chunks = tuple(args.chunks or ((16, 32) if args.quick else (512, 1024)))
    cfg = Config(temperature=args.temperature, alpha=args.alpha, mis_rate=args.mis_rate,
                 ignore_fraction=args.ignore_fraction, seed=args.seed, chunks=chunks)
    base_shapes = QUICK_SHAPES if args.quick else DEFAULT_SHAPES
    shapes = {g: getattr(args, f"{g}_shapes") or base_shapes[g] for g in VARIANTS_BY_GROUP}
    groups = all_variants(cfg, args.compile)
    patterns = [p.strip() for p in args.rows.split(",") if p.strip()]
    if args.list:
        for variant in select(groups, ["*"]):
            print(f"{variant.name:48s} vs {variant.reference:28s} {variant.label}")
        return 0
    chosen = select(groups, patterns)
    if not chosen:
        raise SystemExit(f"--rows {args.rows!r} matches no row; --list shows the names")
    by_name = {v.name: v for variants in groups.values() for v in variants}
    if args.compile:
        import torch._dynamo as dynamo

        # one compiled graph per (loss, shape): raise the recompile limit so none falls back to eager silently
        for key in ("cache_size_limit", "recompile_limit", "accumulated_cache_size_limit"):
            if hasattr(dynamo.config, key):
                setattr(dynamo.config, key, max(256, getattr(dynamo.config, key)))

    machine = machine_info()
    command = shlex.join(["python", "benchmarks/bench_losses.py", *(sys.argv[1:] if argv is None else argv)])
    print(f"machine: {machine['cpu']}, {machine['cores']} cores, {machine['memory_gib']:.0f} GiB, "
          f"torch {machine['torch']} (MKL {machine['mkl']}), Python {machine['python']}, {machine['date']}, "
          f"load {machine['load_average'][0]:.1f}")
    print(f"command: {command}")
    print(f"config: {asdict(cfg)}, threads {args.threads}, repeats {args.min_repeats}-{args.repeats} "
          f"(row budget {args.row_seconds:.0f} s), warmup {args.warmup}, clock {args.clock}")

    group_of = {v.name: g for g, variants in groups.items() for v in variants}
    rows: list[dict] = []
    for variant in chosen:
        group = group_of[variant.name]
        for shape in shapes[group]:
            rows.append({"group": group, "name": variant.name, "label": variant.label, "shape": list(shape),
                         "reference": variant.reference, "reference_label": by_name[variant.reference].label,
                         "expect": variant.expect, "status": "ok", "results": {}})

    # build each callable once (a missing peer marks its rows), and each group's inputs once per shape
    built: dict[str, LossFn] = {}
    unavailable: dict[str, str] = {}
    for name in {r["name"] for r in rows} | {r["reference"] for r in rows}:
        try:
            built[name] = by_name[name].build(cfg)
        except Unavailable as exc:
            unavailable[name] = str(exc)
    for row in rows:
        missing = unavailable.get(row["name"]) or unavailable.get(row["reference"])
        if missing:
            row["status"] = missing

    failed = False
    saved_threads = torch.get_num_threads()
    try:
        if not args.memory_only:
            runnable = [r for r in rows if r["status"] == "ok"]
            for threads in args.threads:
                torch.set_num_threads(threads)
                for group in VARIANTS_BY_GROUP:
                    for shape in shapes[group]:
                        todo = [r for r in runnable if r["group"] == group and tuple(r["shape"]) == shape]
                        if not todo:
                            continue
                        x = make_inputs(group, shape, cfg)
                        for row in todo:
                            index = rows.index(row) + 1
                            started = time.perf_counter()
                            try:
                                result = time_pair(built[row["reference"]], built[row["name"]], x, args,
                                                   row["expect"], _value_scale(group, row["reference"], cfg))
                            except Exception as exc:  # a peer's changed API, a compile failure, ...
                                result = {"status": f"error: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}"}
                                failed = True
                            row["results"][str(threads)] = result
                            failed |= result.get("value_check") == "MISMATCH"
                            print(f"[{index}/{len(rows)}] {row['name']} {shape_text(shape)} threads={threads}: "
                                  f"{ratio_cell(result)}"
                                  + (f", {ms_text(result['var_median_ms'])} vs {ms_text(result['ref_median_ms'])} ms, "
                                     f"values {result['value_check']}" if result.get("status") == "ok" else "")
                                  + f" ({time.perf_counter() - started:.0f} s)", flush=True)
                            if args.profile and threads == args.threads[0] and result.get("status") == "ok":
                                profile_variant(built[row["name"]], x, row["name"])
                        del x
                        gc.collect()
        for row in rows:
            if row["status"] != "ok" and not row["results"]:
                print(f"[{rows.index(row) + 1}/{len(rows)}] {row['name']} {shape_text(row['shape'])}: "
                      f"{row['status']}", flush=True)

        reference_memory: dict = {}
        if not args.no_memory:
            memory_threads = args.memory_threads or max(args.threads)
            for row in rows:
                if row["status"] != "ok" or row["name"].endswith("@compile"):
                    continue  # compiling in a fresh process would measure the compiler, not the loss
                for name, is_ref in ((row["reference"], True), (row["name"], False)):
                    key = (row["group"], tuple(row["shape"]), name)
                    if is_ref and key in reference_memory:
                        continue
                    mem = measure_memory(row["group"], row["shape"], name, cfg, memory_threads)
                    failed |= mem["status"] != "ok"
                    if is_ref:
                        reference_memory[key] = mem
                    else:
                        row["memory"] = mem
                    extra = f"{mib_text(mem['extra_mib'])} MiB ({mem['copies']:.2f} copies)" \
                        if mem["status"] == "ok" else mem["status"]
                    print(f"memory {name} {shape_text(row['shape'])}: {extra}", flush=True)
    finally:
        torch.set_num_threads(saved_threads)

    report = {
        "machine": machine,
        "command": command,
        "config": {**asdict(cfg), "threads": args.threads, "repeats": args.repeats, "min_repeats": args.min_repeats,
                   "row_seconds": args.row_seconds, "warmup": args.warmup, "clock": args.clock,
                   "compile": args.compile, "shapes": {g: [list(s) for s in v] for g, v in shapes.items()}},
        "load_average_end": os.getloadavg(),
        "rows": rows,
        "reference_memory": [{"group": g, "shape": list(s), "name": n, **mem}
                             for (g, s, n), mem in reference_memory.items()],
    }
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(report, fh, indent=1)
        print(f"wrote {args.json}")
    if args.markdown:
        with open(args.markdown, "w") as fh:
            fh.write(markdown_report([report]))
        print(f"wrote {args.markdown}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
