"""A plain float64 reference of the sparse (top-k + label + tail bucket) losses, independent of locakd.

Everything is written in linear probability space from the definitions: the dense teacher
distribution (optionally LoCa-calibrated with the paper's formula), merged into buckets (each
stored token, the label, everything else), against the student's distribution merged the same
way. The student logits keep autograd, so tests can compare gradients too.
"""

from __future__ import annotations

import torch

IGNORE = -100


def loca_dense64(p: torch.Tensor, labels: torch.Tensor, alpha: float) -> torch.Tensor:
    """The paper's calibration of probability rows ``p [N, V]`` (float64, labels valid)."""
    rows = torch.arange(p.shape[0])
    p_gt = p[rows, labels]
    p_k = p.max(dim=-1).values
    mis = p_gt < p_k
    s = torch.where(mis, alpha / (1 - p_gt + p_k), torch.ones_like(p_gt))
    out = p * s.unsqueeze(-1)
    out[rows, labels] = 1 - s * (1 - p_gt)
    return torch.where(mis.unsqueeze(-1), out, p)


def _kl(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    safe_b = torch.where(a > 0, b, torch.ones_like(b))
    return torch.where(a > 0, a * (torch.log(torch.where(a > 0, a, torch.ones_like(a))) - torch.log(safe_b)),
                       torch.zeros_like(a)).sum(-1)


def divergence_linear(name: str, P: torch.Tensor, Q: torch.Tensor, beta: float, lam: float) -> torch.Tensor:
    if name == "forward_kl":
        return _kl(P, Q)
    if name == "reverse_kl":
        return _kl(Q, P)
    if name == "jsd":
        m = beta * P + (1 - beta) * Q
        return beta * _kl(P, m) + (1 - beta) * _kl(Q, m)
    if name == "skew_forward_kl":
        return _kl(P, lam * P + (1 - lam) * Q)
    if name == "skew_reverse_kl":
        return _kl(Q, lam * Q + (1 - lam) * P)
    if name == "total_variation":
        return 0.5 * (P - Q).abs().sum(-1)
    raise ValueError(name)


def buckets(probs: torch.Tensor, stored: torch.Tensor) -> torch.Tensor:
    """Merge ``probs [N, V]`` into [stored tokens (in ``stored``'s order, -1 = empty slot), rest]."""
    keep = torch.zeros_like(probs, dtype=torch.bool)
    parts = []
    for j in range(stored.shape[1]):
        ids = stored[:, j]
        present = ids >= 0
        safe = ids.clamp(min=0)
        parts.append(torch.where(present, probs.gather(1, safe[:, None]).squeeze(1), torch.zeros_like(probs[:, 0])))
        keep |= torch.nn.functional.one_hot(safe, probs.shape[1]).bool() & present[:, None]
    rest = torch.where(keep, torch.zeros_like(probs), probs).sum(-1)
    return torch.stack(parts + [rest], dim=1)


def sparse_ref(student_logits, teacher_logits, labels, k, divergence, *, loca_alpha=None, temperature=1.0,
               jsd_beta=0.5, skew_lambda=0.1, normalizer=None):
    """Mean (or sum / normalizer) over valid rows of the bucket divergence, float64."""
    valid = labels != IGNORE
    zs = student_logits.reshape(-1, student_logits.shape[-1])[valid.reshape(-1)].double()
    zt = teacher_logits.reshape(-1, teacher_logits.shape[-1])[valid.reshape(-1)].double()
    y = labels.reshape(-1)[valid.reshape(-1)]
    p = torch.softmax(zt / temperature, dim=-1)
    top_ids = p.topk(k, dim=-1).indices
    label_slot = torch.where((top_ids == y[:, None]).any(1), torch.full_like(y, -1), y)
    stored = torch.cat([top_ids, label_slot[:, None]], dim=1)
    target = p if loca_alpha is None else loca_dense64(p, y, loca_alpha)
    P = buckets(target, stored)
    Q = buckets(torch.softmax(zs / temperature, dim=-1), stored)
    total = divergence_linear(divergence, P, Q, jsd_beta, skew_lambda).sum()
    return total / (normalizer if normalizer is not None else max(int(valid.sum()), 1))


def sparse_inputs(teacher_logits, labels, k, temperature=1.0, dtype=torch.float32):
    """(topk_ids, topk_logprobs, label_logprob, tail_logprob) of a dense teacher, from float64 math."""
    lp = torch.log_softmax(teacher_logits.double() / temperature, dim=-1)
    top, ids = lp.topk(k, dim=-1)
    safe = labels.clamp(min=0).unsqueeze(-1)
    label_lp = lp.gather(-1, safe).squeeze(-1)
    others = lp.scatter(-1, ids, float("-inf")).scatter(-1, safe, float("-inf"))
    tail = torch.logsumexp(others, dim=-1)
    return ids, top.to(dtype), label_lp.to(dtype), tail.to(dtype)
