#!/usr/bin/env python
"""Quick speed/memory checks of the core losses against the textbook formulas (issue 10 targets).

Not the benchmark table (that is ``bench_losses.py``): a small harness the core's author uses to
check a target while working. Every group times forward + backward of each variant on the same
inputs in one process, interleaved (the order rotates between repetitions), and prints for each
variant the median and the range of its ratio to the group's baseline measured in the same
repetition (paired ratios), at one thread unless ``--threads``.

    python benchmarks/bench_core_check.py kd                  # kd_loss / dkd_loss vs textbook KD / DKD
    python benchmarks/bench_core_check.py token               # token divergences vs textbook forward KL
    python benchmarks/bench_core_check.py linear              # fused lm-head path vs h @ W.T + textbook
    python benchmarks/bench_core_check.py token --memory      # peak extra RSS per variant (fresh process each)
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

import locakd


# --------------------------------------------------------------------------- textbook formulas
def textbook_kd(s, t, temperature):
    """Hinton KD as in mdistiller / torchdistill."""
    log_q = F.log_softmax(s / temperature, dim=1)
    p = F.softmax(t / temperature, dim=1)
    return F.kl_div(log_q, p, reduction="batchmean") * temperature**2


def textbook_dkd(logits_student, logits_teacher, target, alpha=1.0, beta=8.0, temperature=4.0):
    """mdistiller's DKD (Zhao et al. 2022), verbatim up to names."""
    gt_mask = torch.zeros_like(logits_student).scatter_(1, target.unsqueeze(1), 1).bool()
    other_mask = torch.ones_like(logits_student).scatter_(1, target.unsqueeze(1), 0).bool()
    pred_student = F.softmax(logits_student / temperature, dim=1)
    pred_teacher = F.softmax(logits_teacher / temperature, dim=1)

    def cat_mask(t, mask1, mask2):
        t1 = (t * mask1).sum(dim=1, keepdims=True)
        t2 = (t * mask2).sum(1, keepdims=True)
        return torch.cat([t1, t2], dim=1)

    pred_student = cat_mask(pred_student, gt_mask, other_mask)
    pred_teacher = cat_mask(pred_teacher, gt_mask, other_mask)
    log_pred_student = torch.log(pred_student)
    tckd = F.kl_div(log_pred_student, pred_teacher, reduction="sum") * temperature**2 / target.shape[0]
    pred_teacher_part2 = F.softmax(logits_teacher / temperature - 1000.0 * gt_mask, dim=1)
    log_pred_student_part2 = F.log_softmax(logits_student / temperature - 1000.0 * gt_mask, dim=1)
    nckd = F.kl_div(log_pred_student_part2, pred_teacher_part2, reduction="sum") * temperature**2 / target.shape[0]
    return alpha * tckd + beta * nckd


def textbook_forward_kl(s, t):
    return F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1), log_target=True, reduction="sum")


# --------------------------------------------------------------------------- inputs
def kd_inputs(rows, classes, seed=0):
    gen = torch.Generator().manual_seed(seed)
    teacher = torch.randn(rows, classes, generator=gen) * 2.0
    student = torch.randn(rows, classes, generator=gen) * 2.0
    labels = torch.randint(0, classes, (rows,), generator=gen)
    return student, teacher, labels


def token_inputs(rows, vocab, seed=0, ignored=0.0):
    student, teacher, labels = kd_inputs(rows, vocab, seed)
    if ignored:
        gen = torch.Generator().manual_seed(seed + 1)
        labels = torch.where(torch.rand(rows, generator=gen) < ignored, -100, labels)
    return student, teacher, labels


# --------------------------------------------------------------------------- groups
def kd_group(shape):
    s, t, y = kd_inputs(*shape)
    temp = 4.0
    return s, {
        "textbook KD": lambda x: textbook_kd(x, t, temp),
        "kd_loss": lambda x: locakd.kd_loss(x, t, temp, y),
        "kd_loss+loca": lambda x: locakd.kd_loss(x, t, temp, y, loca_alpha=0.9),
        "textbook DKD": lambda x: textbook_dkd(x, t, y, temperature=temp),
        "dkd_loss": lambda x: locakd.dkd_loss(x, t, y, temperature=temp),
        "dkd_loss+loca": lambda x: locakd.dkd_loss(x, t, y, temperature=temp, loca_alpha=0.9),
    }, {"textbook DKD": ["textbook DKD", "dkd_loss", "dkd_loss+loca"]}


def token_group(shape, divergences=("forward_kl",), chunk_sizes=(None, 1024), ignored=0.0):
    s, t, y = token_inputs(*shape, ignored=ignored)
    variants = {"textbook FKL": lambda x: textbook_forward_kl(x, t)}
    for name in divergences:
        for loca in (None, 0.9):
            for chunk in chunk_sizes:
                label = f"{name}{'+loca' if loca else ''} chunk={chunk}"
                variants[label] = (
                    lambda x, name=name, loca=loca, chunk=chunk: locakd.token_distill_loss(
                        x, t, y, name, loca_alpha=loca, chunk_size=chunk, reduction="sum"
                    )
                )
    try:
        from torchtune.modules.loss import ForwardKLWithChunkedOutputLoss

        tune = ForwardKLWithChunkedOutputLoss(num_output_chunks=8)
        y2 = y.unsqueeze(0)

        def torchtune_chunked(x):
            return tune(list(x.unsqueeze(0).chunk(8, dim=1)), list(t.unsqueeze(0).chunk(8, dim=1)), y2)

        variants["torchtune chunked(8)"] = torchtune_chunked
    except ImportError:  # optional
        pass
    return s, variants, {}


def linear_group(tokens, hidden, vocab, chunk_sizes=(256, 1024)):
    gen = torch.Generator().manual_seed(0)
    hs = torch.randn(tokens, hidden, generator=gen)
    ht = torch.randn(tokens, hidden, generator=gen)
    ws = torch.randn(vocab, hidden, generator=gen) / hidden**0.5 * 2
    wt = torch.randn(vocab, hidden, generator=gen) / hidden**0.5 * 2
    y = torch.randint(0, vocab, (tokens,), generator=gen)

    def unfused(x):
        with torch.no_grad():
            teacher = ht @ wt.T
        return textbook_forward_kl(x @ ws.T, teacher)

    variants = {"unfused h@W.T + textbook FKL": unfused}
    for chunk in chunk_sizes:
        for loca in (None, 0.9):
            variants[f"fused chunk={chunk}{' +loca' if loca else ''}"] = (
                lambda x, chunk=chunk, loca=loca: locakd.linear_token_distill_loss(
                    x, ws, ht, wt, y, loca_alpha=loca, chunk_size=chunk, reduction="sum"
                )
            )
    return hs, variants, {}


# --------------------------------------------------------------------------- timing
def fwd_bwd(fn, leaf):
    x = leaf.detach().requires_grad_(True)
    fn(x).backward()
    return x.grad


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def time_group(leaf, variants, baselines, reps, warmup=1, clock=time.perf_counter):
    names = list(variants)
    for _ in range(warmup):
        for name in names:
            fwd_bwd(variants[name], leaf)
    times = {name: [] for name in names}
    for rep in range(reps):
        order = names[rep % len(names):] + names[: rep % len(names)]
        for name in order:
            start = clock()
            fwd_bwd(variants[name], leaf)
            times[name].append(clock() - start)
    base_of = {name: names[0] for name in names}
    for base, members in baselines.items():
        for member in members:
            base_of[member] = base
    rows = []
    for name in names:
        base = base_of[name]
        ratios = [a / b for a, b in zip(times[name], times[base], strict=True)]
        rows.append((name, base, statistics.median(times[name]), statistics.median(ratios), min(ratios), max(ratios)))
    return rows


def print_rows(title, rows):
    print(f"\n## {title}")
    print(f"{'variant':36s} {'median s':>9s} {'ratio':>6s} {'range':>13s}  vs")
    for name, base, med, ratio, low, high in rows:
        print(f"{name:36s} {med:9.4f} {ratio:6.3f} {low:6.3f}-{high:5.3f}  {base}")


# --------------------------------------------------------------------------- memory (fresh process per variant)
def rss_bytes():
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def memory_child(group, spec, variant):
    leaf, variants, _ = build(group, spec)
    fn = variants[variant]
    before = rss_bytes()
    fwd_bwd(fn, leaf)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"variant": variant, "extra_bytes": peak - before}))


def build(group, spec):
    if group == "kd":
        return kd_group(spec)
    if group == "token":
        return token_group(spec[:2], divergences=spec[2], ignored=spec[3])
    return linear_group(*spec[:3], chunk_sizes=spec[3])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("group", choices=["kd", "token", "linear"])
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--clock", choices=list(CLOCKS), default="wall",
                        help="wall time, or this process's CPU time (steadier on a shared machine)")
    parser.add_argument("--shapes", default=None, help="comma list, e.g. 8192x100,1024x1000 (linear: 8192x768x50257)")
    parser.add_argument("--divergences", default="forward_kl")
    parser.add_argument("--ignored", type=float, default=0.0, help="fraction of ignore_index rows (token group)")
    parser.add_argument("--chunks", default="256,1024", help="chunk sizes of the fused variants (linear group)")
    parser.add_argument("--memory", action="store_true", help="peak extra RSS per variant, fresh process each")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    default = {"kd": "8192x100,1024x1000,4096x32000", "token": "2048x32000,2048x50257", "linear": "8192x768x50257"}
    shapes = [tuple(int(v) for v in s.split("x")) for s in (args.shapes or default[args.group]).split(",")]
    divergences = tuple(args.divergences.split(","))
    for shape in shapes:
        spec = {"kd": shape, "token": (*shape, divergences, args.ignored)}.get(
            args.group, (*shape, tuple(int(c) for c in args.chunks.split(",")))
        )
        if args.child is not None:
            memory_child(args.group, spec, args.child)
            return
        if args.memory:
            _, variants, _ = build(args.group, spec)
            print(f"\n## peak extra memory {args.group} {shape}")
            for name in variants:
                out = subprocess.run(
                    [sys.executable, __file__, args.group, "--shapes", "x".join(map(str, shape)),
                     "--divergences", args.divergences, "--ignored", str(args.ignored), "--chunks", args.chunks,
                     "--child", name],
                    capture_output=True, text=True, check=True,
                )
                extra = json.loads(out.stdout.strip().splitlines()[-1])["extra_bytes"]
                print(f"{name:36s} {extra / 2**20:10.1f} MiB")
            continue
        leaf, variants, baselines = build(args.group, spec)
        print_rows(f"{args.group} {shape} threads={args.threads} reps={args.reps} clock={args.clock}",
                   time_group(leaf, variants, baselines, args.reps, clock=CLOCKS[args.clock]))


if __name__ == "__main__":
    main()
