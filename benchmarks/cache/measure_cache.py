#!/usr/bin/env python
"""Teacher cache: bytes per token, and the quantisation error it introduces in the sparse losses.

Three measurements (CPU, nothing downloaded):

  sizes  bytes per cached token at k = 32, 64, 128 for vocabularies of 50257, 152064 and 262144,
         from caches actually written (rows + label side table + offsets + safetensors header)
  zipf   quantisation error on synthetic Zipf-like next-token distributions at a given vocabulary
  lm     the same on a small trained LM: teacher and student folders of the CPU LM benchmark
         (benchmarks/lm/run_lm_bench.py), on the training responses as lm-distill tokenises them

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
from locakd.lm.cache import TeacherCache, TeacherCacheWriter, TokenRecords, teacher_token_records
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
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    parser.add_argument("--levels", type=int, default=128, help="value levels of the codec (default 128)")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    started = time.time()
    result = {"sizes": cmd_sizes, "zipf": cmd_zipf, "lm": cmd_lm}[args.command](args)
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
