#!/usr/bin/env python
"""Training from an offline teacher cache against the online teacher: size, step time, loss agreement, quality.

Everything runs on the CPU LM benchmark's "instructions" task (benchmarks/lm/run_lm_bench.py: the generated
instruction suite, a byte-level BPE tokenizer trained locally, the lm-sft teacher of 0.88M parameters and the
0.14M-parameter students), reusing that script's data, configs and teacher; nothing is downloaded. Parts
(--parts, in this order):

  sizes      `locakd lm-cache-teacher` writes a cache of the benchmark teacher at each k of --ks; bytes per
             cached token = bytes of the train split's shard files / the manifest's num_tokens. The row
             width of a 152064-token vocabulary is computed from the same codec for comparison
             (benchmarks/cache/measure_cache.py sizes measures synthetic caches on disk).
  steptime   one lm-distill optimizer step (the trainer's accumulate_gradients: forward + backward, then
             clipping and AdamW) of two identical students on the same micro-batch, with the online teacher
             (teacher forward + dense loss) against the cache (cache lookup + sparse loss). The teacher is a random-init GPT-2 of the same
             vocabulary, --timing-teacher-ratio x (at least) the student's parameters; its cache is
             captured by lm-cache-teacher (the one-off capture cost, tokens/s, gives the break-even
             number of epochs). Steps alternate between the two paths (order swapped every pair), so
             both see the same load; reported: the median of the paired ratios online/cache.
  quality    lm-distill students trained with each --methods from the dense online teacher and from the
             k = --quality-k cache, same seeds and settings, each scored by lm-eval on the held-out test
             set (ROUGE-L and exact match, greedy); paired per-seed differences cache - dense.
  agreement  the loss from the cache against the dense loss on identical batches: the first --agreement-
             batches training micro-batches, per divergence with and without LoCa, for the student at
             initialisation and (when the quality part has run) the dense-KD student of seed 0. The
             difference is split into the top-k truncation (exact top-k records vs dense) and the
             quantisation (cache vs exact top-k records).

Examples:
  python benchmarks/cache/bench_cache_training.py                 # everything (~25 min, 2 busy CPU cores)
  python benchmarks/cache/bench_cache_training.py --quick         # smaller data and runs (~2 min)
  python benchmarks/cache/bench_cache_training.py --smoke         # ~1 min run of every part for the test suite
  python benchmarks/cache/bench_cache_training.py --parts sizes,agreement

Finished teacher, caches and student runs in --out are reused when the script runs again with the same
settings (--force starts over). Results: OUT/results.json and OUT/results.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks" / "lm"))

import run_lm_bench as lm_bench  # noqa: E402  (the CPU LM benchmark: data, configs, teacher, run helpers)

TASK = "instructions"
ALL_PARTS = ("sizes", "steptime", "quality", "agreement")
DEFAULT_METHODS = ("kd", "kd+loca")
AGREEMENT_METHODS = ("kd", "kd+loca", "rkl", "rkl+loca")
SYNTHETIC_VOCAB = 152064

# Sizes of each mode. "lm" is the task's sizes as run_lm_bench.py takes them (records, vocabulary, batch,
# teacher and student steps); the rest sets this script's own measurements.
FULL = {"lm": lm_bench.FULL[TASK], "seeds": (0, 1, 2), "timing_pairs": 30, "timing_warmup": 3,
        "agreement_batches": 20, "timing_examples": 1024}
QUICK = {"lm": {**lm_bench.QUICK[TASK], "teacher_steps": 60, "steps": 30}, "seeds": (0,), "timing_pairs": 8,
         "timing_warmup": 2, "agreement_batches": 4, "timing_examples": 256}
SMOKE = {"lm": {"n_train": 96, "n_valid": 16, "n_test": 16, "vocab": 300, "batch": 16, "teacher_steps": 3,
                "steps": 2, "max_new_tokens": 4, "sample_seeds": None},
         "seeds": (0,), "timing_pairs": 2, "timing_warmup": 1, "agreement_batches": 2, "timing_examples": 64}


def _info(message: str) -> None:
    print(f"bench_cache_training: {message}", file=sys.stderr, flush=True)


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


# ------------------------------------------------------------------------------------------------
# Task, teacher, caches
# ------------------------------------------------------------------------------------------------


class Task:
    """The benchmark task's folder: data, tokenizer, model configs, the trained teacher, configs of every run."""

    def __init__(self, out: Path, sizes: dict[str, Any]) -> None:
        self.dir = out / TASK
        self.sizes = sizes["lm"]
        self.paths = lm_bench.prepare_task(TASK, self.sizes, self.dir, None)

    @property
    def teacher(self) -> Path:
        return self.dir / "teacher" / "best"

    def config(self, out_dir: Path, *, steps: int, seed: int) -> dict[str, Any]:
        """run_lm_bench.py's config of a run of this task (same data, template, lengths, optimiser)."""
        s = self.sizes
        return lm_bench.base_config(self.paths, out_dir, steps=steps, seed=seed, lr=2e-3, batch=s["batch"],
                                    eval_every=lm_bench._eval_every(steps), max_new_tokens=s["max_new_tokens"])

    def teacher_job(self) -> tuple[Any, tuple] | None:
        """run_lm_bench.py's lm-sft teacher (the same config, so a finished one is reused)."""
        n = self.sizes["teacher_steps"]
        cfg = self.config(self.dir / "teacher", steps=n, seed=0)
        cfg["model"]["student"] = str(self.paths["teacher_init"])
        return lm_bench.plan_run(self.dir / "teacher", cfg, self.dir / "configs" / "teacher_sft.yaml", "lm-sft",
                                 self.sizes["sample_seeds"], self.dir / "logs" / "teacher.log")

    def capture(self, name: str, teacher: Path, k: int) -> dict[str, Any]:
        """``locakd lm-cache-teacher`` of ``teacher`` at top-k ``k`` into ``DIR/caches/name``; its report.

        The report of the invocation that captured the cache is kept (``capture_run.json``): running the
        command on a complete cache reports no throughput.
        """
        cache_dir = self.dir / "caches" / name
        kept = cache_dir / "capture_run.json"
        if kept.is_file():
            report = _read_json(kept)
            if report.get("status") == "complete" and report.get("top_k") == k and report.get("teacher") == str(teacher):
                return report
        if cache_dir.exists():
            shutil.rmtree(cache_dir)
        cfg = self.config(self.dir / "caches" / f"{name}_run", steps=1, seed=0)
        cfg["model"]["teacher"] = str(teacher)
        cfg["cache"] = {"dir": str(cache_dir), "top_k": k, "batch_size": 32}
        cfg_path = lm_bench._write_yaml(self.dir / "configs" / f"cache_{name}.yaml", cfg)
        lm_bench.run_cli(["lm-cache-teacher", str(cfg_path)], str(self.dir / "logs" / f"cache_{name}.log"))
        report = _read_json(cache_dir / "capture.json")
        if report.get("status") != "complete":
            raise RuntimeError(f"lm-cache-teacher left {cache_dir} {report.get('status')}; see the log")
        kept.write_text(json.dumps(report, indent=2) + "\n")
        return report


def shard_bytes(split_dir: Path) -> int:
    """Bytes of a cache split's shard files (the safetensors payloads; commit records excluded)."""
    return sum(p.stat().st_size for p in (split_dir / "shards").glob("shard-*.safetensors"))


# ------------------------------------------------------------------------------------------------
# Part 1: sizes
# ------------------------------------------------------------------------------------------------


def part_sizes(task: Task, ks: list[int]) -> dict[str, Any]:
    from locakd.lm.cache import CacheCodec, TeacherCache

    rows = []
    for k in ks:
        report = task.capture(f"teacher_k{k}", task.teacher, k)
        split = Path(report["cache_dir"]) / "train"
        cache = TeacherCache(split)
        on_disk = shard_bytes(split)
        synthetic = CacheCodec(vocab_size=SYNTHETIC_VOCAB, top_k=k, num_levels=cache.codec.num_levels)
        rows.append({
            "k": k, "vocab_size": cache.vocab_size, "num_tokens": cache.num_tokens, "num_examples": cache.num_examples,
            "shard_bytes": on_disk, "bytes_per_token": on_disk / cache.num_tokens,
            "row_bytes": cache.codec.row_bytes, "manifest_bytes_per_token": cache.bytes_per_token,
            "labels_outside_topk": 1.0 - _label_stored_share(cache),
            "capture_tokens_per_s": report.get("tokens_per_s"),
            f"row_bytes_v{SYNTHETIC_VOCAB}": synthetic.row_bytes,
        })
        _info(f"sizes: k={k}: {on_disk} B of shards / {cache.num_tokens} tokens = {on_disk / cache.num_tokens:.1f} "
              f"B/token (row {cache.codec.row_bytes} B; V={SYNTHETIC_VOCAB} row {synthetic.row_bytes} B)")
    return {"teacher": str(task.teacher), "rows": rows}


def _label_stored_share(cache) -> float:
    """Share of cached tokens whose label is among the stored top-k ids (from the shards' side tables)."""
    import numpy as np

    outside = 0
    for index in range(-(-cache.num_examples // cache.examples_per_shard)):
        outside += int(np.asarray(cache._shard(index)["label_outside_rows"]).shape[0])
    return 1.0 - outside / max(cache.num_tokens, 1)


# ------------------------------------------------------------------------------------------------
# Part 2: step time
# ------------------------------------------------------------------------------------------------


def timing_teacher(task: Task, ratio: float) -> tuple[Path, int, int]:
    """A random-init GPT-2 teacher (same tokenizer and vocabulary) with >= ``ratio`` x the student's parameters.

    Depth 6 with 4 heads; the width is the smallest multiple of 32 that reaches the ratio. Returns the
    folder, the teacher's and the student's parameter counts.
    """
    import torch
    from transformers import AutoConfig, AutoTokenizer, GPT2LMHeadModel

    from locakd.lm.models import tiny_gpt2_config

    student_cfg = AutoConfig.from_pretrained(task.paths["student_init"])
    student_params = sum(p.numel() for p in GPT2LMHeadModel(student_cfg).parameters())
    folder = task.dir / f"timing_teacher_x{ratio:g}"
    if (folder / "model.safetensors").is_file():
        params = sum(p.numel() for p in GPT2LMHeadModel.from_pretrained(folder).parameters())
        return folder, params, student_params
    tokenizer = AutoTokenizer.from_pretrained(task.paths["tokenizer"])
    width = 64
    while True:
        cfg = tiny_gpt2_config(student_cfg.vocab_size, n_layer=6, n_head=4, n_embd=width,
                               n_positions=student_cfg.n_positions, dropout=0.0)
        torch.manual_seed(0)
        model = GPT2LMHeadModel(cfg)
        params = sum(p.numel() for p in model.parameters())
        if params >= ratio * student_params:
            break
        width += 32
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder, params, student_params


def example_index_key() -> str:
    """The batch key of each row's dataset index: lm-distill's own (trainer integration) when it has one."""
    try:
        from locakd.lm.data import EXAMPLE_INDEX
    except ImportError:
        return "example_indices"
    return EXAMPLE_INDEX


class CachedSparseLoss:
    """The cache side of a micro-batch when locakd's trainer has none yet: the run's objective with the
    divergence from the cache (lookup + :func:`locakd.losses.sparse.sparse_token_distill_loss`)."""

    def __init__(self, objective, cache) -> None:
        self.objective, self.cache = objective, cache

    def __call__(self, student, batch, normalizer, *, autocast=None, count_misinstructed=False):
        from locakd.lm.cache import teacher_cache_targets
        from locakd.losses.objectives import LossTerms, summed_cross_entropy
        from locakd.losses.sparse import sparse_token_distill_loss
        from locakd.losses.token import shift_for_next_token

        o = self.objective
        output = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
        s_logits, targets = shift_for_next_token(output.logits, batch["labels"])
        ce_sum = summed_cross_entropy(s_logits, targets, o.chunk_size)
        t = teacher_cache_targets(self.cache, batch[example_index_key()].tolist(), batch["labels"])
        kd_sum = sparse_token_distill_loss(
            s_logits[..., :self.cache.vocab_size], t.topk_ids, t.topk_logprobs, t.labels, t.label_logprob,
            o.spec.divergence, tail_logprob=t.tail_logprob, loca_alpha=o.loca_alpha if o.spec.loca else None,
            temperature=o.temperature, chunk_size=o.chunk_size, reduction="sum", validate=False)
        loss = ((1.0 - o.kd_ratio) * ce_sum + o.kd_ratio * kd_sum) / normalizer
        return LossTerms(loss, ce_sum.detach(), kd_sum.detach()), output


def gradient_steps(objective, teacher, cache) -> tuple[Any, Any, str]:
    """The forward + backward of one optimizer step's micro-batch, online and from the cache.

    lm-distill's own :func:`locakd.lm.trainer.accumulate_gradients` for both when it reads caches
    (``teacher_cache=``), else the dense micro-batch loss against :class:`CachedSparseLoss`.
    """
    import inspect

    from locakd.lm.trainer import accumulate_gradients

    if "teacher_cache" in inspect.signature(accumulate_gradients).parameters:
        def online(student, batch):
            accumulate_gradients(student, teacher, [batch], objective)

        def offline(student, batch):
            accumulate_gradients(student, None, [batch], objective, teacher_cache=cache)

        return online, offline, "lm-distill's accumulate_gradients(teacher_cache=...)"

    from locakd.lm.batch_loss import micro_batch_loss
    from locakd.lm.data import count_valid_tokens

    dense, sparse = micro_batch_loss(objective, teacher), CachedSparseLoss(objective, cache)

    def with_loss(loss_of):
        def run(student, batch):
            terms, _ = loss_of(student, batch, float(count_valid_tokens(batch["labels"])))
            terms.loss.backward()
        return run

    return with_loss(dense), with_loss(sparse), "benchmark composition (teacher_cache_targets + sparse loss)"


def part_steptime(task: Task, sizes: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from locakd.lm.build import load_run_tokenizer, load_student, load_teacher, tokenize
    from locakd.lm.cache import TeacherCache
    from locakd.lm.data import count_valid_tokens, make_collate_fn
    from locakd.losses.objectives import LMObjective

    teacher_dir, teacher_params, student_params = timing_teacher(task, args.timing_teacher_ratio)
    _info(f"steptime: teacher {teacher_params / 1e6:.2f}M params ({teacher_params / student_params:.1f}x the "
          f"student's {student_params / 1e6:.2f}M); capturing its k={args.timing_k} cache")
    capture = task.capture(f"timing_x{args.timing_teacher_ratio:g}_k{args.timing_k}", teacher_dir, args.timing_k)
    cache = TeacherCache(Path(capture["cache_dir"]) / "train")

    cfg = task.config(task.dir / "timing_run", steps=1, seed=0)
    cfg["model"]["teacher"] = str(teacher_dir)
    cfg["method"]["name"] = args.timing_method
    config = _config(cfg)
    device = torch.device("cpu")
    tokenizer = load_run_tokenizer(config)
    from locakd.lm.build import load_train_valid_records

    examples = tokenize(config, load_train_valid_records(config).train, tokenizer)
    collate = make_collate_fn(tokenizer)
    teacher = load_teacher(config, device, tokenizer)
    objective = LMObjective.from_config(config.method)
    online, offline, offline_path = gradient_steps(objective, teacher, cache)

    gen = torch.Generator().manual_seed(0)
    pool = torch.randperm(len(examples), generator=gen)[:sizes["timing_examples"]].tolist()
    batch_size = task.sizes["batch"]
    n_steps = sizes["timing_warmup"] + sizes["timing_pairs"]
    batches = []
    for step in range(n_steps):
        chosen = [pool[(step * batch_size + j) % len(pool)] for j in range(batch_size)]
        batch = collate([examples[i] for i in chosen])
        batch[example_index_key()] = torch.tensor(chosen)
        batches.append(batch)

    students, optimizers = {}, {}
    for name in ("online", "cache"):
        students[name] = load_student(config, device)  # same seed: identical initial weights
        students[name].train()
        optimizers[name] = torch.optim.AdamW(students[name].parameters(), lr=2e-3, weight_decay=0.01)
    paths = {"online": online, "cache": offline}

    def step(name: str, batch: dict[str, torch.Tensor]) -> float:
        model, opt = students[name], optimizers[name]
        started = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        paths[name](model, batch)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        return time.perf_counter() - started

    times: dict[str, list[float]] = {"online": [], "cache": []}
    teacher_fwd, cache_read = [], []
    tokens = []
    for i, batch in enumerate(batches):
        order = ("online", "cache") if i % 2 == 0 else ("cache", "online")
        measured = {name: step(name, batch) for name in order}
        # the two components on their own (same batch), for the explanation
        started = time.perf_counter()
        with torch.no_grad():
            teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
        forward_s = time.perf_counter() - started
        started = time.perf_counter()
        cache.batch_targets(batch[example_index_key()].tolist(), batch["labels"][:, 1:])
        read_s = time.perf_counter() - started
        if i < sizes["timing_warmup"]:
            continue
        for name in times:
            times[name].append(measured[name])
        teacher_fwd.append(forward_s)
        cache_read.append(read_s)
        tokens.append(int(count_valid_tokens(batch["labels"])))
        _info(f"steptime: pair {len(tokens)}/{sizes['timing_pairs']}: online {1e3 * measured['online']:.1f} ms, "
              f"cache {1e3 * measured['cache']:.1f} ms")
    ratios = [a / b for a, b in zip(times["online"], times["cache"], strict=True)]
    online_ms, cache_ms = (1e3 * statistics.median(times[n]) for n in ("online", "cache"))
    tokens_per_step = statistics.fmean(tokens)
    capture_s_per_token = 1.0 / capture["tokens_per_s"] if capture.get("tokens_per_s") else None
    saved_s_per_token = (online_ms - cache_ms) / 1e3 / tokens_per_step
    return {
        "teacher": str(teacher_dir), "teacher_params": teacher_params, "student_params": student_params,
        "param_ratio": teacher_params / student_params, "method": args.timing_method, "k": args.timing_k,
        "cache_path": offline_path, "batch": batch_size, "pairs": len(ratios), "warmup_pairs": sizes["timing_warmup"],
        "threads": torch.get_num_threads(), "response_tokens_per_step": tokens_per_step,
        "online_ms_median": online_ms, "cache_ms_median": cache_ms,
        "ratio_median": statistics.median(ratios), "ratio_p25": _quantile(ratios, 0.25),
        "ratio_p75": _quantile(ratios, 0.75), "ratios": ratios,
        "teacher_forward_ms_median": 1e3 * statistics.median(teacher_fwd),
        "cache_read_ms_median": 1e3 * statistics.median(cache_read),
        "capture_tokens_per_s": capture.get("tokens_per_s"), "capture_seconds": capture.get("capture_seconds"),
        "capture_tokens": capture.get("captured_tokens"),
        "break_even_epochs": (capture_s_per_token / saved_s_per_token
                              if capture_s_per_token and saved_s_per_token > 0 else None),
    }


def _config(cfg: dict[str, Any]):
    """The LMExperimentConfig of a config dict (as lm-distill would load it from its YAML)."""
    from locakd.config import from_dict
    from locakd.lm.config import LMExperimentConfig

    return from_dict(LMExperimentConfig, cfg)


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    position = q * (len(ordered) - 1)
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


# ------------------------------------------------------------------------------------------------
# Part 3: quality
# ------------------------------------------------------------------------------------------------


def student_dir(task: Task, source: str, method: str, seed: int) -> Path:
    return task.dir / "students" / source / method / f"seed{seed}"


def part_quality(task: Task, cache_dir: Path, methods: list[str], seeds: list[int], steps: int, jobs: int,
                 threads: int) -> dict[str, Any]:
    calls = []
    for source in ("dense", "cache"):
        for method in methods:
            for seed in seeds:
                run_dir = student_dir(task, source, method, seed)
                cfg = task.config(run_dir, steps=steps, seed=seed)
                cfg["method"]["name"] = method
                if source == "dense":
                    cfg["model"]["teacher"] = str(task.teacher)
                else:
                    cfg["model"]["teacher_cache"] = str(cache_dir)
                job = lm_bench.plan_run(run_dir, cfg, task.dir / "configs" / f"student_{source}_{method}_seed{seed}.yaml",
                                        "lm-distill", task.sizes["sample_seeds"],
                                        task.dir / "logs" / f"{source}_{method}_seed{seed}.log")
                if job is not None:
                    calls.append(job)
    _info(f"quality: {len(calls)} student run(s) to train/evaluate ({jobs} job(s) x {threads} thread(s))")
    started = time.time()
    _run_all(calls, jobs, threads)
    rows: dict[str, Any] = {}
    for method in methods:
        per_seed = []
        for seed in seeds:
            entry = {"seed": seed}
            for source in ("dense", "cache"):
                run = student_dir(task, source, method, seed)
                ev, sm = _read_json(run / "eval" / "eval.json"), _read_json(run / "summary.json")
                entry[source] = {"rouge_l": ev["rouge_l_mean"], "exact_match": ev["exact_match_mean"],
                                 "valid_rouge_l": sm["best"]["value"], "train_time_s": sm["wall_time_s"],
                                 "teacher_misinstruction": (sm.get("teacher_misinstruction") or {}).get(
                                     "misinstruction_rate")}
            per_seed.append(entry)
        summary = {"runs": per_seed}
        for metric in ("rouge_l", "exact_match"):
            for source in ("dense", "cache"):
                summary[f"{metric}_{source}"] = _mean_std([r[source][metric] for r in per_seed])
            summary[f"{metric}_diff"] = _mean_std([r["cache"][metric] - r["dense"][metric] for r in per_seed])
        rows[method] = summary
    teacher_eval = _read_json(task.dir / "teacher" / "eval" / "eval.json")
    return {"methods": rows, "seeds": seeds, "steps": steps, "cache": str(cache_dir),
            "teacher": {"rouge_l": teacher_eval["rouge_l_mean"], "exact_match": teacher_eval["exact_match_mean"]},
            "wall_time_s": round(time.time() - started, 1)}


def _mean_std(values: list[float]) -> list[float]:
    return [statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0]


def _run_all(calls: list[tuple[Any, tuple]], jobs: int, threads: int) -> None:
    if not calls:
        return
    if jobs <= 1:
        for fn, fn_args in calls:
            argv, seconds = fn(*fn_args)
            _info(f"  done in {seconds:6.1f}s: locakd {' '.join(argv[:2])}")
        return
    with ProcessPoolExecutor(max_workers=jobs, initializer=lm_bench._init_worker, initargs=(threads,)) as pool:
        futures = [pool.submit(fn, *fn_args) for fn, fn_args in calls]
        for fut in as_completed(futures):
            argv, seconds = fut.result()
            _info(f"  done in {seconds:6.1f}s: locakd {' '.join(argv[:2])}")


# ------------------------------------------------------------------------------------------------
# Part 4: loss agreement
# ------------------------------------------------------------------------------------------------


def part_agreement(task: Task, cache_dir: Path, k: int, n_batches: int) -> dict[str, Any]:
    import torch

    from locakd.lm.build import (
        load_run_tokenizer,
        load_student,
        load_teacher,
        load_train_valid_records,
        tokenize,
    )
    from locakd.lm.cache import TeacherCache, teacher_cache_targets, teacher_token_records
    from locakd.lm.config import method_spec
    from locakd.lm.data import make_collate_fn
    from locakd.losses.objectives import summed_cross_entropy
    from locakd.losses.sparse import sparse_token_distill_loss
    from locakd.losses.token import shift_for_next_token, token_distill_loss

    cfg = task.config(task.dir / "agreement_run", steps=1, seed=0)
    cfg["model"]["teacher"] = str(task.teacher)
    config = _config(cfg)
    device = torch.device("cpu")
    tokenizer = load_run_tokenizer(config)
    examples = tokenize(config, load_train_valid_records(config).train, tokenizer)
    collate = make_collate_fn(tokenizer)
    teacher = load_teacher(config, device, tokenizer)
    cache = TeacherCache(cache_dir / "train")
    students = {"initialisation (seed 0)": load_student(config, device)}
    trained = student_dir(task, "dense", "kd", 0) / "final"
    if trained.is_dir():
        from transformers import AutoModelForCausalLM

        students["dense KD student, seed 0, final"] = AutoModelForCausalLM.from_pretrained(trained)
    batch_size = task.sizes["batch"]
    n_batches = min(n_batches, len(examples) // batch_size)
    kd_ratio = config.method.kd_ratio
    n_tokens = sum(sum(label != -100 for label in examples[i]["labels"][1:]) for i in range(n_batches * batch_size))

    out: dict[str, Any] = {"k": k, "batches": n_batches, "batch": batch_size, "cache": str(cache_dir),
                           "kd_ratio": kd_ratio, "students": {}}
    for student_name, student in students.items():
        student.eval()
        sums = {m: {"dense": [], "topk": [], "cache": [], "ce": []} for m in AGREEMENT_METHODS}
        for b in range(n_batches):
            indices = list(range(b * batch_size, (b + 1) * batch_size))  # lm-distill's first epoch in index order
            batch = collate([examples[i] for i in indices])
            with torch.no_grad():
                kwargs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "use_cache": False}
                s_logits, targets = shift_for_next_token(student(**kwargs).logits, batch["labels"])
                t_logits, _ = shift_for_next_token(teacher(**kwargs).logits, batch["labels"])
                ce = float(summed_cross_entropy(s_logits, targets))
                valid = targets != -100
                exact = teacher_token_records(t_logits, targets, top_k=k)
                cached = teacher_cache_targets(cache, indices, batch["labels"])
                for method in AGREEMENT_METHODS:
                    spec = method_spec(method)
                    alpha = config.method.loca_alpha if spec.loca else None
                    common = {"loca_alpha": alpha, "reduction": "sum"}
                    sums[method]["dense"].append(float(token_distill_loss(
                        s_logits, t_logits, targets, spec.divergence, **common)))
                    sums[method]["topk"].append(float(sparse_token_distill_loss(
                        s_logits[valid], exact.topk_ids, exact.topk_logprobs, exact.labels, exact.label_logprob,
                        spec.divergence, tail_logprob=exact.tail_logprob, **common)))
                    sums[method]["cache"].append(float(sparse_token_distill_loss(
                        s_logits, cached.topk_ids, cached.topk_logprobs, cached.labels, cached.label_logprob,
                        spec.divergence, tail_logprob=cached.tail_logprob, **common)))
                    sums[method]["ce"].append(ce)
        table = {}
        for method, s in sums.items():
            def total(kd: list[float], ce: list[float] = s["ce"]) -> list[float]:
                return [(1 - kd_ratio) * c + kd_ratio * x for c, x in zip(ce, kd, strict=True)]

            table[method] = {
                "dense_loss_per_token": sum(s["dense"]) / n_tokens,
                "cache_vs_dense": _summary(rel(s["cache"], s["dense"])),
                "topk_vs_dense": _summary(rel(s["topk"], s["dense"])),
                "cache_vs_topk": _summary(rel(s["cache"], s["topk"])),
                "training_loss_cache_vs_dense": _summary(rel(total(s["cache"]), total(s["dense"]))),
            }
            _info(f"agreement: {student_name}: {method}: cache vs dense {table[method]['cache_vs_dense']['mean']:+.2e}, "
                  f"quantisation {table[method]['cache_vs_topk']['mean']:+.2e}")
        out["students"][student_name] = table
    return out


def rel(a: list[float], b: list[float]) -> list[float]:
    """Per-element relative difference (a - b) / b."""
    return [(x - y) / y for x, y in zip(a, b, strict=True)]


def _summary(values: list[float]) -> dict[str, float]:
    """Signed mean, mean and max of |x| over batches."""
    return {"mean": statistics.fmean(values), "abs_mean": statistics.fmean(abs(v) for v in values),
            "abs_max": max(abs(v) for v in values)}


# ------------------------------------------------------------------------------------------------
# Report
# ------------------------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    model = None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": model or platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "platform": platform.platform(), "python": platform.python_version(),
            "torch": lm_bench._version("torch"), "transformers": lm_bench._version("transformers"),
            "load_avg": list(os.getloadavg()) if hasattr(os, "getloadavg") else None}


def markdown(results: dict[str, Any]) -> str:
    m = results["machine"]
    lines = [f"Machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']}, transformers {m['transformers']}. "
             f"Last invocation: `{results['command']}`, wall {results['wall_time_s'] / 60:.1f} min. Each part "
             "below names the invocation that measured it and the 1/5/15-minute load average at its start.", ""]
    parts = results["parts"]

    def origin(part: dict[str, Any]) -> list[str]:
        if "command" not in part:  # results written before parts recorded their invocation
            return []
        return [f"`{part['command']}` ({part['finished']}, {part['wall_s'] / 60:.1f} min, load average "
                f"{_fmt(part['load_avg_start'])})", ""]
    if "sizes" in parts:
        lines += ["### Bytes per cached token (lm-cache-teacher on the benchmark's training split)", "",
                  *origin(parts["sizes"]),
                  f"Vocabulary {parts['sizes']['rows'][0]['vocab_size']}; bytes/token = shard files / cached "
                  "tokens; capture tokens/s of that lm-cache-teacher invocation.", "",
                  f"| k | tokens | shard bytes | bytes/token | row bytes | labels outside top k | "
                  f"row bytes at V = {SYNTHETIC_VOCAB} | capture tokens/s |", "|---|---|---|---|---|---|---|---|"]
        for r in parts["sizes"]["rows"]:
            lines.append(f"| {r['k']} | {r['num_tokens']} | {r['shard_bytes']} | {r['bytes_per_token']:.1f} | "
                         f"{r['row_bytes']} | {100 * r['labels_outside_topk']:.1f} % | "
                         f"{r[f'row_bytes_v{SYNTHETIC_VOCAB}']} | {_num(r['capture_tokens_per_s'], 0)} |")
        lines.append("")
    if "steptime" in parts:
        s = parts["steptime"]
        lines += ["### Step time: online teacher vs cache", "", *origin(s),
                  f"Teacher {s['teacher_params'] / 1e6:.2f}M params (random init, {s['param_ratio']:.1f}x the "
                  f"student's {s['student_params'] / 1e6:.2f}M), method {s['method']}, batch {s['batch']} "
                  f"({s['response_tokens_per_step']:.0f} response tokens/step on average), k = {s['k']}, "
                  f"{s['threads']} torch thread(s); cache side: {s['cache_path']}; {s['pairs']} interleaved pairs "
                  f"after {s['warmup_pairs']} warm-up pairs.", "",
                  "| online ms/step | cache ms/step | online/cache (median of paired ratios) | p25-p75 | "
                  "teacher forward ms | cache read ms | capture tokens/s | break-even epochs |",
                  "|---|---|---|---|---|---|---|---|",
                  f"| {s['online_ms_median']:.1f} | {s['cache_ms_median']:.1f} | **{s['ratio_median']:.2f}x** | "
                  f"{s['ratio_p25']:.2f}-{s['ratio_p75']:.2f} | {s['teacher_forward_ms_median']:.1f} | "
                  f"{s['cache_read_ms_median']:.1f} | {_num(s['capture_tokens_per_s'], 0)} | "
                  f"{_num(s['break_even_epochs'])} |", ""]
        history = results.get("steptime_history", [])
        if len(history) > 1:
            lines += ["Every step-time invocation on this folder:", "",
                      "| finished | threads | pairs | load average | online ms | cache ms | online/cache | p25-p75 |",
                      "|---|---|---|---|---|---|---|---|"]
            lines += [f"| {h['finished']} | {h['threads']} | {h['pairs']} | {_fmt(h['load_avg_start'])} | "
                      f"{h['online_ms_median']:.1f} | {h['cache_ms_median']:.1f} | {h['ratio_median']:.2f}x | "
                      f"{h['ratio_p25']:.2f}-{h['ratio_p75']:.2f} |" for h in history]
            lines.append("")
    if "quality" in parts:
        q = parts["quality"]
        lines += ["### Quality: students from the cache vs from the dense online teacher", "", *origin(q),
                  f"Test ROUGE-L / exact match (greedy), mean +- std over seeds {q['seeds']}, {q['steps']} steps; "
                  f"diff = cache - dense per seed (mean +- std). Teacher: ROUGE-L {q['teacher']['rouge_l']:.2f}, "
                  f"exact match {q['teacher']['exact_match']:.2f}.", "",
                  "| method | ROUGE-L dense | ROUGE-L cache | diff | exact dense | exact cache | diff | "
                  "train s/run dense / cache | teacher mis-instruction dense / cache |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for method, r in q["methods"].items():
            wall = {src: statistics.fmean(x[src]["train_time_s"] for x in r["runs"]) for src in ("dense", "cache")}
            mis = {src: r["runs"][0][src]["teacher_misinstruction"] for src in ("dense", "cache")}
            lines.append(f"| {method} | {_pm(r['rouge_l_dense'])} | {_pm(r['rouge_l_cache'])} | "
                         f"{_pm(r['rouge_l_diff'], sign=True)} | {_pm(r['exact_match_dense'])} | "
                         f"{_pm(r['exact_match_cache'])} | {_pm(r['exact_match_diff'], sign=True)} | "
                         f"{wall['dense']:.0f} / {wall['cache']:.0f} | {_pct(mis['dense'])} / {_pct(mis['cache'])} |")
        lines.append("")
    if "agreement" in parts:
        a = parts["agreement"]
        lines += ["### Loss from the cache vs the dense loss on identical batches", "", *origin(a),
                  f"First {a['batches']} training micro-batches of {a['batch']} examples, k = {a['k']}; relative "
                  "difference of each batch's summed divergence: signed mean over batches / max |.|; "
                  f"'training loss' is (1 - {a['kd_ratio']}) CE + {a['kd_ratio']} divergence.", ""]
        for student, table in a["students"].items():
            lines += [f"Student: {student}", "",
                      "| method | dense divergence/token | cache vs dense | top-k truncation (exact top-k vs dense) | "
                      "quantisation (cache vs exact top-k) | training loss, cache vs dense |", "|---|---|---|---|---|---|"]
            for method, r in table.items():
                lines.append(f"| {method} | {r['dense_loss_per_token']:.4f} | {_rel(r['cache_vs_dense'])} | "
                             f"{_rel(r['topk_vs_dense'])} | {_rel(r['cache_vs_topk'])} | "
                             f"{_rel(r['training_loss_cache_vs_dense'])} |")
            lines.append("")
    return "\n".join(lines)


def _rel(s: dict[str, float]) -> str:
    return f"{s['mean']:+.2e} / {s['abs_max']:.2e}"


def _pm(v: list[float], sign: bool = False) -> str:
    return f"{v[0]:+.2f} +- {v[1]:.2f}" if sign else f"{v[0]:.2f} +- {v[1]:.2f}"


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.2f} %"


def _num(x: float | None, digits: int = 2) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def _fmt(load: Any) -> str:
    return "n/a" if not load else "/".join(f"{x:.1f}" for x in load)


# ------------------------------------------------------------------------------------------------
# Main
# ------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=None,
                        help="output folder (default runs/cache_bench; runs/cache_bench_quick with --quick, "
                             "runs/cache_bench_smoke with --smoke)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true",
                      help="1000 records, teacher 60 steps, students 30 steps, 1 seed, 8 timing pairs (~2 min); "
                           "its quality figures are too undertrained to compare")
    mode.add_argument("--smoke", action="store_true",
                      help="a ~1-minute run of every part on 96 records (the test suite runs it); "
                           "the figures mean nothing")
    parser.add_argument("--parts", default=",".join(ALL_PARTS),
                        help="comma-separated subset of: " + ", ".join(ALL_PARTS) + " (default: all)")
    parser.add_argument("--ks", default="32,64,128", help="top-k values of the sizes part (default 32,64,128)")
    parser.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                        help="lm-distill methods of the quality part (default kd,kd+loca)")
    parser.add_argument("--seeds", default=None, help="training seeds of the quality part (default 0,1,2; "
                                                      "--quick/--smoke: 0)")
    parser.add_argument("--steps", type=int, default=None,
                        help="optimizer steps of each student of the quality part (default: run_lm_bench.py's, 210)")
    parser.add_argument("--quality-k", type=int, default=64,
                        help="top-k of the cache the quality and agreement parts train from (default 64)")
    parser.add_argument("--timing-teacher-ratio", type=float, default=10.0,
                        help="the step-time teacher has at least this many times the student's parameters (default 10)")
    parser.add_argument("--timing-k", type=int, default=64, help="top-k of the step-time cache (default 64)")
    parser.add_argument("--timing-method", default="kd+loca", help="lm-distill method timed (default kd+loca)")
    parser.add_argument("--timing-pairs", type=int, default=None,
                        help="interleaved online/cache step pairs timed (default 30; --quick 8; --smoke 2)")
    parser.add_argument("--agreement-batches", type=int, default=None,
                        help="training micro-batches of the agreement part (default 20; --quick 4; --smoke 2)")
    parser.add_argument("--jobs", type=int, default=None,
                        help="student runs in parallel in the quality part, each with cores / jobs threads "
                             "(default: CPU cores, at most 4); the other parts run in this process with --threads")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads of the work done in this process (captures, step time, agreement; "
                             "default 1: on a shared machine, more threads than free cores make torch's OpenMP "
                             "regions wait for descheduled threads, which slowed steps 10-18x on the 2-core box)")
    parser.add_argument("--report", action="store_true",
                        help="measure nothing: rewrite OUT/results.md from OUT/results.json")
    parser.add_argument("--force", action="store_true", help="delete --out first instead of reusing finished work")
    args = parser.parse_args(argv)
    if args.out is None:
        args.out = str(ROOT / "runs" / ("cache_bench_smoke" if args.smoke else
                                        "cache_bench_quick" if args.quick else "cache_bench"))
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sizes = dict(SMOKE if args.smoke else QUICK if args.quick else FULL)
    sizes["lm"] = dict(sizes["lm"])
    if args.timing_pairs is not None:
        sizes["timing_pairs"] = args.timing_pairs
    if args.agreement_batches is not None:
        sizes["agreement_batches"] = args.agreement_batches
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = [p for p in parts if p not in ALL_PARTS]
    if unknown:
        raise SystemExit(f"bench_cache_training: unknown part(s) {unknown}; choose from {', '.join(ALL_PARTS)}")
    ks = sorted({int(k) for k in args.ks.split(",")})
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    from locakd.lm.config import method_spec

    for m in [*methods, args.timing_method]:
        if method_spec(m).divergence is None:
            raise SystemExit(f"bench_cache_training: method {m!r} trains without a teacher")
    seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else list(sizes["seeds"])
    steps = args.steps or sizes["lm"]["steps"]
    cores = os.cpu_count() or 1
    jobs = args.jobs or max(1, min(cores, 4))
    threads = max(1, cores // jobs)

    out = Path(args.out).resolve()
    if args.report:
        table = markdown(_read_json(out / "results.json"))
        (out / "results.md").write_text(table + "\n")
        print(table)
        return 0
    if args.force and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    load_start = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    lm_bench._init_worker(args.threads)
    _info(f"parts {parts} -> {out}")
    task = Task(out, sizes)
    job = task.teacher_job()
    if job is not None:
        _info("training the benchmark teacher (lm-sft) and scoring it (lm-eval)")
    _run_all([job] if job else [], 1, cores)

    command = " ".join(["python", *([sys.argv[0]] if argv is None else ["benchmarks/cache/bench_cache_training.py"]),
                         *(sys.argv[1:] if argv is None else argv)])
    mode = "smoke" if args.smoke else "quick" if args.quick else "full"
    # parts measured by earlier invocations on this --out stay in the results (each with its own command)
    previous = out / "results.json"
    kept = _read_json(previous) if previous.is_file() else {}
    if kept.get("mode") != mode:
        kept = {}
    results: dict[str, Any] = {"command": command, "mode": mode, "load_avg_start": load_start, "settings": {
        "task": TASK, "sizes": sizes, "ks": ks, "methods": methods, "seeds": seeds, "steps": steps,
        "quality_k": args.quality_k, "jobs": jobs, "teacher": lm_bench.TEACHER, "student": lm_bench.STUDENT},
        "parts": {k: v for k, v in kept.get("parts", {}).items() if k not in parts},
        "steptime_history": kept.get("steptime_history", [])}
    quality_cache = None
    if "sizes" in parts or "quality" in parts or "agreement" in parts:
        quality_cache = Path(task.capture(f"teacher_k{args.quality_k}", task.teacher, args.quality_k)["cache_dir"])
    for part in parts:
        t0 = time.time()
        load = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
        _info(f"part {part}")
        if part == "sizes":
            result = part_sizes(task, ks)
        elif part == "steptime":
            result = part_steptime(task, sizes, args)
        elif part == "quality":
            result = part_quality(task, quality_cache, methods, seeds, steps, jobs, threads)
        else:
            result = part_agreement(task, quality_cache, args.quality_k, sizes["agreement_batches"])
        result.update(command=command, wall_s=round(time.time() - t0, 1), load_avg_start=load,
                      load_avg_end=list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
                      finished=time.strftime("%Y-%m-%d %H:%M:%S"))
        results["parts"][part] = result
        if part == "steptime":
            results["steptime_history"].append({k: v for k, v in result.items() if k != "ratios"})
        _info(f"part {part} done in {time.time() - t0:.1f}s")
    results["machine"] = machine()
    results["wall_time_s"] = round(time.time() - started, 1)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    table = markdown(results)
    (out / "results.md").write_text(table + "\n")
    print(table)
    _info(f"done in {results['wall_time_s'] / 60:.1f} min -> {out / 'results.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
