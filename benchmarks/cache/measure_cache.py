#!/usr/bin/env python
"""Teacher cache: bytes per token, and the quantisation error it introduces in the sparse losses.

Measurements (CPU, nothing downloaded):

  sizes    bytes per cached token at k = 32, 64, 128 for vocabularies of 50257, 152064 and 262144,
           from caches actually written (rows + label side table + offsets + safetensors header)
  zipf     quantisation error on synthetic Zipf-like next-token distributions at a given vocabulary
  lm       the same on a small trained LM: teacher and student folders of the CPU LM benchmark
           (benchmarks/lm/run_lm_bench.py), on the training responses as lm-distill tokenises them
  spread   the *signed* error of the batch loss over many tokens, split into batches: its mean over
           batches (a bias) and its spread (noise that averages out as 1 / sqrt(tokens)), for
           several numbers of value levels
  buckets  where reverse KL's error comes from: L(cache) - L(exact) = sum_b q_b (log p_b - log p^_b)
           exactly (q: the student's bucket probabilities), summed per bucket group (stored
           entries by their gap below the top, the label slot, the tail), and the error when one
           part is decoded exactly (the tail, the label's value, the row's anchor)

The error of a loss is |L(cache) - L(exact records)| / L(exact records), where "exact records" are
the same top-k / label / tail values in float32 before quantisation; reported for the whole batch
(the loss a trainer optimises: a mean over tokens) and per token (median, 99th percentile), for every
divergence with and without LoCa, with the relative L2 error of the student gradient. The top-k
truncation error (exact records against the dense teacher) is reported beside it for scale.

Examples:
  python benchmarks/cache/measure_cache.py sizes
  python benchmarks/cache/measure_cache.py zipf --vocab 152064 --tokens 1024
  python benchmarks/cache/measure_cache.py lm --teacher RUN/teacher/final --student RUN/sft/final \
      --config RUN/configs/teacher.yaml
  python benchmarks/cache/measure_cache.py spread --vocab 152064 --tokens 2048 --levels 128 256
  python benchmarks/cache/measure_cache.py buckets --vocab 152064 --tokens 256 --seeds 0 1 2 3
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from locakd import DIVERGENCES, token_distill_loss
from locakd.lm.cache import CacheCodec, TeacherCache, TeacherCacheWriter, TokenRecords, teacher_token_records
from locakd.losses.sparse import sparse_teacher_buckets, sparse_token_distill_loss
from locakd.losses.token import divergence_rows

VOCABS = (50257, 152064, 262144)
KS = (32, 64, 128)


# --------------------------------------------------------------------------------------------------
# Synthetic teachers
# --------------------------------------------------------------------------------------------------


def zipf_logits(rows: int, vocab: int, gen: torch.Generator) -> torch.Tensor:
    """Zipf-like next-token logits: -a * s * log(rank) + noise, ranks on random ids, a and s varying per row
    (from flat rows with a large tail to rows with one dominant token)."""
    log_rank = torch.log(torch.arange(1, vocab + 1, dtype=torch.float32))
    s = torch.rand(rows, 1, generator=gen) * 2.0 + 0.6
    a = torch.rand(rows, 1, generator=gen) * 2.0 + 0.5
    z = (-s * log_rank + torch.randn(rows, vocab, generator=gen) * 0.5) * a
    return z.gather(1, torch.argsort(torch.rand(rows, vocab, generator=gen), dim=1))


def sample_labels(logits: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Labels drawn from the teacher's own distribution (as data tokens roughly are)."""
    return torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=gen).squeeze(1)


# --------------------------------------------------------------------------------------------------
# Cache round trip of records
# --------------------------------------------------------------------------------------------------


def write_and_read(records: list[TokenRecords], vocab: int, k: int, directory: Path,
                   levels: int = 128) -> tuple[TeacherCache, list]:
    """Write one example per record group into a cache; read every example back (with its labels)."""
    writer = TeacherCacheWriter(directory, identity={"bench": "measure_cache"}, vocab_size=vocab,
                                num_examples=len(records), top_k=k, examples_per_shard=64,
                                num_levels=levels)
    for shard in writer.pending_shards():
        writer.write_shard(shard, TokenRecords.concat([records[i] for i in writer.shard_examples(shard)]))
    assert writer.finalize()
    cache = TeacherCache(directory)
    return cache, [cache.read([i], labels=records[i].labels) for i in range(len(records))]


# --------------------------------------------------------------------------------------------------
# Error of the losses
# --------------------------------------------------------------------------------------------------


class ErrorAccumulator:
    """Sums over token blocks: loss values, per-token values, gradient difference norms."""

    def __init__(self) -> None:
        self.sums: dict[str, dict[str, list]] = {}

    def add(self, key: str, exact_rows, cache_rows, grad_diff_sq: float, grad_sq: float, dense_sum: float | None):
        s = self.sums.setdefault(key, {"exact": [], "cache": [], "gd": 0.0, "g": 0.0, "dense": 0.0})
        s["exact"].append(exact_rows)
        s["cache"].append(cache_rows)
        s["gd"] += grad_diff_sq
        s["g"] += grad_sq
        if dense_sum is not None:
            s["dense"] += dense_sum

    def table(self) -> dict[str, dict[str, float]]:
        out = {}
        for key, s in self.sums.items():
            exact = torch.cat(s["exact"]).double()
            cache = torch.cat(s["cache"]).double()
            per_token = ((cache - exact).abs() / exact.abs().clamp(min=1e-12)).numpy()
            out[key] = {
                "loss_exact": float(exact.mean()),
                "batch_rel_error": abs(float(cache.sum() / exact.sum()) - 1),
                "token_rel_error_median": float(np.median(per_token)),
                "token_rel_error_p99": float(np.quantile(per_token, 0.99)),
                "grad_rel_error": math.sqrt(s["gd"] / max(s["g"], 1e-300)),
                "topk_vs_dense_rel": abs(float(exact.sum()) / s["dense"] - 1) if s["dense"] else None,
            }
        return out


def per_row(student, ids, top, labels, label_lp, tail, divergence, alpha):
    """Per-token bucket divergence (float32) and the gradient of their sum."""
    student = student.detach().requires_grad_(True)
    loss = sparse_token_distill_loss(student, ids, top, labels, label_lp, divergence, tail_logprob=tail,
                                     loca_alpha=alpha, reduction="sum", validate=False)
    loss.backward()
    with torch.no_grad():
        target, outside = sparse_teacher_buckets(ids, top, labels, label_lp, tail, loca_alpha=alpha)
        log_q = torch.log_softmax(student.detach().float(), dim=-1)
        label_ids = torch.where(outside, labels, ids[:, 0])
        stored = torch.cat([log_q.gather(1, ids), torch.where(outside, log_q.gather(1, label_ids[:, None]).squeeze(1),
                                                                torch.tensor(-math.inf)).unsqueeze(1)], dim=1)
        rest = log_q.scatter(1, ids, -math.inf).scatter(1, label_ids[:, None], -math.inf).logsumexp(1)
        rows = divergence_rows(divergence, torch.cat([stored, rest[:, None]], dim=1), target)
    return rows, student.grad


def measure_block(acc: ErrorAccumulator, teacher_logits, student_logits, labels, k, directory, *, dense=True,
                  divergences=DIVERGENCES, levels=128):
    """Records -> cache -> losses on one block of tokens (teacher_logits [N, V], labels [N])."""
    records = teacher_token_records(teacher_logits[None], labels[None], top_k=k)
    _, (decoded,) = write_and_read([records], teacher_logits.shape[-1], k, directory, levels)
    for divergence in divergences:
        for alpha in (None, 0.9):
            exact_rows, exact_grad = per_row(student_logits, records.topk_ids, records.topk_logprobs, labels,
                                             records.label_logprob, records.tail_logprob, divergence, alpha)
            cache_rows, cache_grad = per_row(student_logits, decoded.topk_ids, decoded.topk_logprobs, labels,
                                             decoded.label_logprob, decoded.tail_logprob, divergence, alpha)
            dense_sum = None
            if dense:
                dense_sum = float(token_distill_loss(student_logits, teacher_logits, labels, divergence,
                                                     loca_alpha=alpha, reduction="sum", validate=False))
            acc.add(f"{divergence}{'+loca' if alpha else ''}", exact_rows, cache_rows,
                    float((cache_grad - exact_grad).double().pow(2).sum()), float(exact_grad.double().pow(2).sum()),
                    dense_sum)


# --------------------------------------------------------------------------------------------------
# Commands
# --------------------------------------------------------------------------------------------------


def cmd_sizes(args) -> dict:
    gen = torch.Generator().manual_seed(0)
    out = {}
    for vocab in VOCABS:
        logits = zipf_logits(args.tokens, vocab, gen)
        labels = sample_labels(logits, gen)
        for k in KS:
            examples = [teacher_token_records(logits[i:i + 32][None], labels[i:i + 32][None], top_k=k)
                        for i in range(0, args.tokens, 32)]
            with tempfile.TemporaryDirectory() as tmp:
                cache, _ = write_and_read(examples, vocab, k, Path(tmp), args.levels)
                out[f"{vocab}/{k}"] = {"vocab": vocab, "k": k, "row_bytes": cache.codec.row_bytes,
                                       "bytes_per_token": cache.bytes_per_token,
                                       "label_outside_share": float(np.mean([
                                           not bool((e.topk_ids == e.labels[:, None]).any(1)[j])
                                           for e in examples for j in range(e.num_tokens)]))}
            print(f"V={vocab:>6} k={k:>3}: row {out[f'{vocab}/{k}']['row_bytes']} B, "
                  f"{out[f'{vocab}/{k}']['bytes_per_token']:.1f} B/token on disk", file=sys.stderr, flush=True)
    return out


def cmd_zipf(args) -> dict:
    gen = torch.Generator().manual_seed(args.seed)
    result = {}
    for noise in args.student_noise:
        acc = ErrorAccumulator()
        for start in range(0, args.tokens, args.block):
            rows = min(args.block, args.tokens - start)
            teacher = zipf_logits(rows, args.vocab, gen)
            labels = sample_labels(teacher, gen)
            student = teacher + torch.randn(teacher.shape, generator=gen) * noise
            with tempfile.TemporaryDirectory() as tmp:
                measure_block(acc, teacher, student, labels, args.k, Path(tmp), dense=not args.no_dense,
                              levels=args.levels)
        result[f"student_noise_{noise}"] = acc.table()
    return result


def cmd_lm(args) -> dict:
    from locakd.lm.build import load_run_tokenizer, load_train_valid_records, tokenize
    from locakd.lm.config import load_lm_config
    from locakd.lm.data import make_collate_fn
    from locakd.lm.models import load_causal_lm
    from locakd.losses import shift_for_next_token

    config = load_lm_config(args.config, [])
    tokenizer = load_run_tokenizer(config, args.teacher)
    examples = tokenize(config, load_train_valid_records(config).train, tokenizer)
    examples = list(examples)[: args.examples]
    teacher = load_causal_lm(args.teacher, dtype="float32").eval()
    student = load_causal_lm(args.student, dtype="float32").eval()
    collate = make_collate_fn(tokenizer)
    vocab = teacher.config.vocab_size
    result: dict = {"vocab": vocab, "examples": len(examples)}
    for k in args.k:
        acc = ErrorAccumulator()
        records_all = []
        for start in range(0, len(examples), 16):
            batch = collate(examples[start:start + 16])
            with torch.no_grad():
                t_logits = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                s_logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            t, labels = shift_for_next_token(t_logits, batch["labels"])
            s, _ = shift_for_next_token(s_logits, batch["labels"])
            valid = labels != -100
            records_all += [teacher_token_records(t[i:i + 1], labels[i:i + 1], top_k=k) for i in range(t.shape[0])]
            with tempfile.TemporaryDirectory() as tmp:
                measure_block(acc, t[valid], s[valid], labels[valid], k, Path(tmp), levels=args.levels)
        with tempfile.TemporaryDirectory() as tmp:
            cache, _ = write_and_read(records_all, vocab, k, Path(tmp), args.levels)
            sizes = {"row_bytes": cache.codec.row_bytes, "bytes_per_token": cache.bytes_per_token,
                     "tokens": cache.num_tokens, "misinstruction_rate": cache.misinstruction()["misinstruction_rate"]}
        result[f"k={k}"] = {"sizes": sizes, "errors": acc.table()}
        print(f"k={k}: {sizes}", file=sys.stderr, flush=True)
    return result


def round_trip(codec: CacheCodec, records: TokenRecords) -> tuple[torch.Tensor, ...]:
    """(ids, top-k log-probs, label log-prob, tail log-prob) after encode + decode, in the records' id order
    per row (so they line up with the records' own entries)."""
    rows, outside_rows, outside_codes = codec.encode(records)
    outside = np.zeros(records.num_tokens, bool)
    outside[outside_rows] = True
    codes = np.zeros(records.num_tokens, np.int64)
    codes[outside_rows] = outside_codes
    dec = codec.decode(rows, outside, codes)
    # back to the records' order of ids (decode returns rank order)
    ids = records.topk_ids.numpy()
    dec_order = np.argsort(dec["topk_ids"], axis=1)
    rec_order = np.argsort(np.argsort(ids, axis=1), axis=1)
    values = np.take_along_axis(np.take_along_axis(dec["topk_logprobs"], dec_order, 1), rec_order, 1)
    return (records.topk_ids, torch.from_numpy(values), torch.from_numpy(dec["label_logprob"]),
            torch.from_numpy(dec["tail_logprob"]))


def bucket_rows(student, ids, top, labels, label_lp, tail, divergence, alpha=None):
    """Per-token bucket divergence (float64 numpy) without the gradient."""
    with torch.no_grad():
        target, outside = sparse_teacher_buckets(ids, top, labels, label_lp, tail, loca_alpha=alpha)
        log_q = torch.log_softmax(student.float(), dim=-1)
        label_ids = torch.where(outside, labels, ids[:, 0])
        stored = torch.cat([log_q.gather(1, ids), torch.where(outside, log_q.gather(1, label_ids[:, None]).squeeze(1),
                                                                torch.tensor(-math.inf)).unsqueeze(1)], dim=1)
        rest = log_q.scatter(1, ids, -math.inf).scatter(1, label_ids[:, None], -math.inf).logsumexp(1)
        return divergence_rows(divergence, torch.cat([stored, rest[:, None]], dim=1), target).double().numpy()


def cmd_spread(args) -> dict:
    """Signed batch errors: per-token losses from exact and decoded records, aggregated per batch."""
    gen = torch.Generator().manual_seed(args.seed)
    codecs = {levels: CacheCodec(args.vocab, args.k, levels) for levels in args.levels}
    rows: dict[str, dict[str, list]] = {}
    for start in range(0, args.tokens, args.block):
        n = min(args.block, args.tokens - start)
        teacher = zipf_logits(n, args.vocab, gen)
        labels = sample_labels(teacher, gen)
        students = {noise: teacher + torch.randn(teacher.shape, generator=gen) * noise for noise in args.student_noise}
        records = teacher_token_records(teacher[None], labels[None], top_k=args.k)
        del teacher
        decoded = {"exact": (records.topk_ids, records.topk_logprobs, records.label_logprob, records.tail_logprob)}
        decoded.update({f"levels={levels}": round_trip(codec, records) for levels, codec in codecs.items()})
        for noise, student in students.items():
            for divergence in args.divergences:
                for alpha in (None, 0.9):
                    key = f"noise {noise}: {divergence}{'+loca' if alpha else ''}"
                    for name, (ids, top, lab, tail) in decoded.items():
                        rows.setdefault(key, {}).setdefault(name, []).append(
                            bucket_rows(student, ids, top, labels, lab, tail, divergence, alpha))
        print(f"{start + n}/{args.tokens} tokens", file=sys.stderr, flush=True)
    out = {}
    for key, by_name in rows.items():
        exact = np.concatenate(by_name.pop("exact"))
        entry = {"loss_per_token": float(exact.mean())}
        for name, parts in by_name.items():
            cache = np.concatenate(parts)
            batches = [cache[i:i + args.batch].sum() / exact[i:i + args.batch].sum() - 1
                       for i in range(0, len(exact), args.batch)]
            entry[name] = {"all_tokens": float(cache.sum() / exact.sum() - 1), "batch_mean": float(np.mean(batches)),
                           "batch_sd": float(np.std(batches, ddof=1)) if len(batches) > 1 else None,
                           "batch_max_abs": float(np.max(np.abs(batches))), "batches": len(batches)}
        out[key] = entry
    return out


def cmd_buckets(args) -> dict:
    """Reverse KL's error by bucket group, and with parts of the record decoded exactly."""
    codec = CacheCodec(args.vocab, args.k, args.levels[0])
    edges = np.array([0.0, 1.0, 3.0, 8.0, 15.0, 41.0])
    groups = [f"stored, gap [{a:g}, {b:g}) nats" for a, b in zip(edges[:-1], edges[1:], strict=True)] + [
        "label slot", "tail"]
    out = {}
    for seed in args.seeds:
        gen = torch.Generator().manual_seed(seed)
        sums = {name: 0.0 for name in ("exact", "cache", "cache, exact tail", "cache, exact label value",
                                        "cache, exact anchor")}
        contrib, mass = np.zeros(len(groups)), np.zeros(len(groups))
        for start in range(0, args.tokens, args.block):
            n = min(args.block, args.tokens - start)
            teacher = zipf_logits(n, args.vocab, gen)
            labels = sample_labels(teacher, gen)
            student = teacher + torch.randn(teacher.shape, generator=gen) * args.student_noise[0]
            records = teacher_token_records(teacher[None], labels[None], top_k=args.k)
            del teacher
            ids, top, lab, tail = round_trip(codec, records)
            exact = (ids, records.topk_logprobs, records.label_logprob, records.tail_logprob)
            # the same decode with one part exact: the anchor is the row's top log-prob, which the
            # decoder derives from the (quantised) tail and gaps
            anchor_shift = records.topk_logprobs.max(1).values - top.max(1).values
            variants = {"exact": exact, "cache": (ids, top, lab, tail),
                        "cache, exact tail": (ids, top, lab, records.tail_logprob),
                        "cache, exact label value": (ids, top, torch.where(torch.isneginf(lab), lab,
                                                                           records.label_logprob), tail),
                        "cache, exact anchor": (ids, top + anchor_shift[:, None], lab + anchor_shift, tail)}
            for name, (i, t, la, ta) in variants.items():
                sums[name] += float(bucket_rows(student, i, t, labels, la, ta, "reverse_kl").sum())
            with torch.no_grad():
                p_exact, outside = sparse_teacher_buckets(*exact[:2], labels, *exact[2:])
                p_cache, _ = sparse_teacher_buckets(ids, top, labels, lab, tail)
                log_q = torch.log_softmax(student.double(), dim=-1)
                label_ids = torch.where(outside, labels, ids[:, 0])
                q_label = torch.where(outside, log_q.gather(1, label_ids[:, None]).squeeze(1).exp(),
                                      torch.zeros((), dtype=torch.float64))
                q_stored = log_q.gather(1, ids).exp()
                q = torch.cat([q_stored, q_label[:, None], (1 - q_stored.sum(1) - q_label)[:, None]], 1).numpy()
                diff = (p_exact.double() - p_cache.double()).numpy()
            diff = np.where(np.isfinite(diff), diff, 0.0)
            gap = (records.topk_logprobs.max(1, keepdim=True).values - records.topk_logprobs).double().numpy()
            which = np.clip(np.digitize(gap, edges) - 1, 0, len(edges) - 2)
            for g in range(len(edges) - 1):
                contrib[g] += float((q[:, :args.k] * diff[:, :args.k])[which == g].sum())
                mass[g] += float(q[:, :args.k][which == g].sum())
            contrib[-2:] += (q[:, args.k:] * diff[:, args.k:]).sum(0)
            mass[-2:] += q[:, args.k:].sum(0)
        total = sums["exact"]
        out[f"seed {seed}"] = {
            "loss_per_token": total / args.tokens,
            "rel_error": {name: value / total - 1 for name, value in sums.items() if name != "exact"},
            "by_bucket": {g: {"rel_error": c / total, "student_mass_per_token": m / args.tokens}
                          for g, c, m in zip(groups, contrib, mass, strict=True)},
        }
        print(f"seed {seed}: {out[f'seed {seed}']['rel_error']}", file=sys.stderr, flush=True)
    return out


def markdown(result: dict) -> str:
    lines = []

    def table(errors: dict) -> None:
        lines.append("| loss | loss (exact records) | batch rel. error | token rel. error median / p99 | "
                     "grad rel. error | top-k vs dense |")
        lines.append("|---|---|---|---|---|---|")
        for key, e in errors.items():
            dense = "" if e["topk_vs_dense_rel"] is None else f"{e['topk_vs_dense_rel']:.1e}"
            lines.append(f"| {key} | {e['loss_exact']:.4f} | {e['batch_rel_error']:.1e} | "
                         f"{e['token_rel_error_median']:.1e} / {e['token_rel_error_p99']:.1e} | "
                         f"{e['grad_rel_error']:.1e} | {dense} |")

    for name, value in result.items():
        if isinstance(value, dict) and "by_bucket" in value:
            lines.append(f"\n### {name}: loss {value['loss_per_token']:.4f} per token\n")
            lines.append("| decoded | rel. error |\n|---|---|")
            lines += [f"| {k} | {v:+.2e} |" for k, v in value["rel_error"].items()]
            lines.append("\n| bucket group | share of the rel. error | student mass per token |\n|---|---|---|")
            lines += [f"| {k} | {v['rel_error']:+.2e} | {v['student_mass_per_token']:.3f} |"
                      for k, v in value["by_bucket"].items()]
            continue
        if isinstance(value, dict) and "loss_per_token" in value:
            if not lines:
                lines.append("| student / loss | loss per token | decoded | all tokens | batch mean | batch sd | "
                             "batch max abs |\n|---|---|---|---|---|---|---|")
            for dec, e in value.items():
                if isinstance(e, dict):
                    sd = "" if e["batch_sd"] is None else f"{e['batch_sd']:.1e}"
                    lines.append(f"| {name} | {value['loss_per_token']:.4f} | {dec} | {e['all_tokens']:+.1e} | "
                                 f"{e['batch_mean']:+.1e} | {sd} | {e['batch_max_abs']:.1e} |")
            continue
        if isinstance(value, dict) and "errors" in value:
            lines.append(f"\n### {name}: {value['sizes']}\n")
            table(value["errors"])
        elif isinstance(value, dict) and value and all(isinstance(v, dict) and "batch_rel_error" in v
                                                       for v in value.values()):
            lines.append(f"\n### {name}\n")
            table(value)
        elif isinstance(value, dict) and "row_bytes" in value:
            lines.append(f"| {value['vocab']} | {value['k']} | {value['row_bytes']} | {value['bytes_per_token']:.1f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("sizes", help="bytes per token at k = 32, 64, 128 for three vocabularies")
    p.add_argument("--tokens", type=int, default=512, help="synthetic tokens per cache")
    p = sub.add_parser("zipf", help="quantisation error on synthetic Zipf-like distributions")
    p.add_argument("--vocab", type=int, default=152064)
    p.add_argument("--k", type=int, default=128)
    p.add_argument("--tokens", type=int, default=1024)
    p.add_argument("--block", type=int, default=128, help="tokens per block (bounds memory)")
    p.add_argument("--student-noise", type=float, nargs="+", default=[1.0, 3.0],
                   help="student logits = teacher logits + N(0, s^2): 1 is a close student, 3 a far one")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-dense", action="store_true", help="skip the dense loss (top-k truncation column)")
    p = sub.add_parser("lm", help="quantisation error on a small trained LM (CPU LM benchmark folders)")
    p.add_argument("--teacher", required=True)
    p.add_argument("--student", required=True)
    p.add_argument("--config", required=True, help="the benchmark's lm-sft/lm-distill config (data, template, lengths)")
    p.add_argument("--examples", type=int, default=256)
    p.add_argument("--k", type=int, nargs="+", default=list(KS), help="top-k values to measure")
    for name, default_levels in (("spread", [128, 256]), ("buckets", [128])):
        p = sub.add_parser(name, help=(
            "signed batch errors over many tokens: bias (mean over batches) and noise (their spread)"
            if name == "spread" else "reverse KL's error by bucket group and with parts decoded exactly"))
        p.add_argument("--vocab", type=int, default=152064)
        p.add_argument("--k", type=int, default=128)
        p.add_argument("--tokens", type=int, default=2048 if name == "spread" else 256)
        p.add_argument("--block", type=int, default=128, help="tokens per block (bounds memory)")
        p.add_argument("--student-noise", type=float, nargs="+", default=[1.0, 3.0] if name == "spread" else [3.0],
                       help="student logits = teacher logits + N(0, s^2)")
        p.add_argument("--levels", type=int, nargs="+", default=default_levels, dest="levels",
                       help="value levels of the codec(s) compared")
        if name == "spread":
            p.add_argument("--batch", type=int, default=256, help="tokens per batch of the batch statistics")
            p.add_argument("--seed", type=int, default=0)
            p.add_argument("--divergences", nargs="+", default=["forward_kl", "reverse_kl", "jsd"])
        else:
            p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    parser.add_argument("--levels", type=int, default=128, dest="default_levels",
                        help="value levels of the codec for sizes / zipf / lm (default 128)")
    args = parser.parse_args(argv)
    if args.command in ("sizes", "zipf", "lm"):
        args.levels = args.default_levels
    torch.manual_seed(0)
    started = time.time()
    result = {"sizes": cmd_sizes, "zipf": cmd_zipf, "lm": cmd_lm, "spread": cmd_spread,
              "buckets": cmd_buckets}[args.command](args)
    meta = {"command": " ".join(sys.argv), "machine": f"{platform.machine()} {platform.system()}, "
            f"{torch.get_num_threads()} threads, torch {torch.__version__}", "seconds": round(time.time() - started, 1)}
    if args.command == "sizes":
        print("| vocabulary | k | row bytes | bytes/token on disk |\n|---|---|---|---|")
    print(markdown(result))
    print(f"\n{meta}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"meta": meta, "result": result}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
