#!/usr/bin/env python
"""CPU benchmark of LM distillation with LoCa: tiny GPT-2s trained from scratch, nothing downloaded.

Pipeline, per task (everything through the ``locakd`` commands, with the YAML configs written to
``OUT/TASK/configs/`` so every run can be repeated by hand):

    records -> train_bpe_tokenizer -> lm-sft teacher -> lm-distill students -> lm-eval

Tasks:
  instructions  the generated instruction suite (9 exact-answer tasks: reverse words, sort numbers,
                add, upper/lower case, k-th word, count a letter, max, count words) in the Dolly
                layout, with a held-out test split. Exact match is meaningful here.
  shakespeare   "Continue the text:" prompt -> continuation cut from tinyshakespeare.txt, test taken
                from the last 10% of the file (split by position). Path: --shakespeare, else the env
                var LOCAKD_SHAKESPEARE, else ../shared/data/tinyshakespeare.txt; skipped with a message
                when absent. ROUGE-L is the metric (exact match is ~0 for free text).

Students (GPT-2 architecture, ~1/6 of the teacher's parameters) are trained with each method over
several seeds; the table reports test ROUGE-L / exact match (mean +- sample std over seeds), the
teacher's scores and its token-level mis-instruction rate on the training responses.

Examples:
  python benchmarks/lm/run_lm_bench.py                       # full default run (~25 min, 2 CPU cores)
  python benchmarks/lm/run_lm_bench.py --quick               # smoke run (~3 min)
  python benchmarks/lm/run_lm_bench.py --tasks instructions --methods kd,kd+loca --seeds 0 --steps 100

Finished runs are reused when the script is started again with the same --out (use --force to start
over). Results: OUT/results.json and OUT/results.md.
"""

from __future__ import annotations

import argparse
import contextlib
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
DEFAULT_SHAKESPEARE = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"
ALL_TASKS = ("instructions", "shakespeare")
DEFAULT_METHODS = ("sft", "kd", "kd+loca", "rkl", "rkl+loca")

# Sizes of the full run; --quick scales them down. Steps are optimizer steps of batch ``batch``;
# --steps / --teacher-steps override them for every task. Test decoding: greedy (sample_seeds None) or
# sampling at temperature 1 / top-p 1 over sample_seeds (MiniLLM's evaluation). Shakespeare uses
# sampling because greedy decoding of these tiny students degenerates into repeated newlines (ROUGE-L 0
# for every method); checkpoint selection stays greedy validation ROUGE-L, with ties (all 0) going to
# the lower validation loss.
FULL = {
    "seeds": (0, 1, 2),
    "instructions": {"n_train": 4000, "n_valid": 100, "n_test": 300, "vocab": 512, "batch": 32,
                     "teacher_steps": 600, "steps": 210, "max_new_tokens": 16, "sample_seeds": None},
    "shakespeare": {"n_train": 4000, "n_valid": 100, "n_test": 300, "vocab": 1024, "batch": 32,
                    "teacher_steps": 450, "steps": 210, "max_new_tokens": 12, "sample_seeds": [10, 20, 30],
                    "prompt_chars": 64, "continuation_chars": 32},
}
QUICK = {
    "seeds": (0,),
    "instructions": {"n_train": 1000, "n_valid": 40, "n_test": 100, "vocab": 400, "batch": 32,
                     "teacher_steps": 100, "steps": 40, "max_new_tokens": 16, "sample_seeds": None},
    "shakespeare": {"n_train": 1000, "n_valid": 40, "n_test": 100, "vocab": 512, "batch": 32,
                    "teacher_steps": 60, "steps": 30, "max_new_tokens": 12, "sample_seeds": [10, 20, 30],
                    "prompt_chars": 64, "continuation_chars": 32},
}
# The generated suite minus repeat_word, which has only 128 distinct instances (32 words x 4 counts).
INSTRUCTION_TASKS = ("reverse_words", "sort_numbers", "add_numbers", "uppercase", "lowercase", "kth_word",
                     "count_letter", "max_number", "count_words")
TEACHER = {"n_layer": 4, "n_head": 4, "n_embd": 128}
STUDENT = {"n_layer": 2, "n_head": 2, "n_embd": 64}
N_POSITIONS = 128


# ------------------------------------------------------------------------------------------------
# Worker side (also used in-process with --jobs 1)
# ------------------------------------------------------------------------------------------------


def _init_worker(threads: int) -> None:
    os.environ["OMP_NUM_THREADS"] = str(threads)
    import torch

    torch.set_num_threads(threads)


def run_cli(argv: list[str], log_path: str) -> tuple[list[str], float]:
    """Run one ``locakd`` command in this process with its output appended to ``log_path``."""
    from locakd.cli.main import main

    started = time.time()
    Path(log_path).parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "a") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        print(f"$ locakd {' '.join(argv)}", flush=True)
        code = main(argv)
    if code != 0:
        raise RuntimeError(f"locakd {' '.join(argv)} failed with exit code {code}; see {log_path}")
    return argv, time.time() - started


def run_train_and_eval(train_argv: list[str] | None, eval_argv: list[str] | None,
                       log_path: str) -> tuple[list[str], float]:
    """Train (unless already done) and evaluate one run; returns (the first command, seconds)."""
    started = time.time()
    if train_argv is not None:
        run_cli(train_argv, log_path)
    if eval_argv is not None:
        run_cli(eval_argv, log_path)
    return train_argv or eval_argv or [], time.time() - started


def plan_run(run_dir: Path, cfg: dict[str, Any], cfg_path: Path, command: str, sample_seeds: list[int] | None,
             log_path: Path) -> tuple[Any, tuple] | None:
    """The job for one run: nothing when it is finished with this config and evaluated with this decoding."""
    import yaml

    trained = False
    summary, saved = run_dir / "summary.json", run_dir / "config.yaml"
    if summary.is_file() and saved.is_file() and json.loads(summary.read_text()).get("status") == "finished":
        old = yaml.safe_load(saved.read_text())
        trained = all(old.get(sec, {}).get(k) == v for sec, values in cfg.items() for k, v in values.items())
    eval_argv = ["lm-eval", str(run_dir)]
    if sample_seeds:
        eval_argv += ["eval.do_sample=true", f"eval.seeds=[{','.join(map(str, sample_seeds))}]"]
    evaluated = False
    eval_json = run_dir / "eval" / "eval.json"
    if trained and eval_json.is_file():
        decoding = json.loads(eval_json.read_text()).get("decoding", {})
        evaluated = bool(decoding.get("do_sample")) == bool(sample_seeds) and (
            not sample_seeds or decoding.get("seeds") == list(sample_seeds))
    if trained and evaluated:
        return None
    if not trained:
        if run_dir.exists():
            shutil.rmtree(run_dir)
        _write_yaml(cfg_path, cfg)
    return run_train_and_eval, (None if trained else [command, str(cfg_path)], eval_argv, str(log_path))


# ------------------------------------------------------------------------------------------------
# Data, tokenizer, model configs
# ------------------------------------------------------------------------------------------------


def _write_yaml(path: Path, data: dict[str, Any]) -> Path:
    import yaml

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def prepare_task(task: str, sizes: dict[str, Any], task_dir: Path, shakespeare: Path | None) -> dict[str, Path]:
    """Records (train/valid/test JSONL), tokenizer and the two model configs (config.json + tokenizer)."""
    from locakd.lm.data import PromptTemplate
    from locakd.lm.fixtures import (
        make_instruction_suite,
        make_shakespeare_prompts,
        train_bpe_tokenizer,
        write_jsonl,
    )
    from locakd.lm.models import tiny_gpt2_config

    data_dir = task_dir / "data"
    paths = {name: data_dir / f"{name}.jsonl" for name in ("train", "valid", "test")}
    paths.update(tokenizer=task_dir / "tokenizer", teacher_init=task_dir / "teacher_init",
                 student_init=task_dir / "student_init")
    if all(p.exists() for p in paths.values()):
        return paths
    n_train, n_valid, n_test = sizes["n_train"], sizes["n_valid"], sizes["n_test"]
    if task == "instructions":
        train, test = make_instruction_suite(n_train + n_valid, n_test, seed=1234, tasks=INSTRUCTION_TASKS)
    else:
        train, test = make_shakespeare_prompts(
            shakespeare, prompt_chars=sizes["prompt_chars"], continuation_chars=sizes["continuation_chars"],
            n_train=n_train + n_valid, n_test=n_test, holdout_fraction=0.1, seed=1234,
        )
    train, valid = train[:n_train], train[n_train:]
    for name, records in (("train", train), ("valid", valid), ("test", test)):
        write_jsonl(records, paths[name])
    template = PromptTemplate.from_config("compact")
    tokenizer = train_bpe_tokenizer((template.format(r) + r["response"] for r in train), sizes["vocab"],
                                    save_dir=paths["tokenizer"], model_max_length=N_POSITIONS)
    for key, dims in (("teacher_init", TEACHER), ("student_init", STUDENT)):
        cfg = tiny_gpt2_config(len(tokenizer), n_positions=N_POSITIONS, dropout=0.0, **dims)
        cfg.save_pretrained(paths[key])
        tokenizer.save_pretrained(paths[key])
    return paths


def base_config(paths: dict[str, Path], out_dir: Path, *, steps: int, seed: int, lr: float, batch: int,
                eval_every: int, max_new_tokens: int) -> dict[str, Any]:
    return {
        "model": {"student": str(paths["student_init"]), "init": "scratch", "tokenizer": str(paths["tokenizer"])},
        "data": {"train": str(paths["train"]), "valid": str(paths["valid"]), "test": str(paths["test"]),
                 "template": "compact", "max_length": N_POSITIONS, "max_prompt_length": 96},
        "method": {"name": "sft", "kd_ratio": 0.5, "loca_alpha": 0.9, "temperature": 1.0, "chunk_size": 1024},
        "optim": {"lr": lr, "weight_decay": 0.01, "schedule": "cosine", "warmup_ratio": 0.05, "grad_clip": 1.0,
                  "micro_batch_size": batch, "grad_accum_steps": 1, "max_steps": steps},
        "run": {"seed": seed, "device": "cpu", "precision": "float32", "out_dir": str(out_dir),
                "log_every": 20, "eval_every": eval_every, "progress": False, "tensorboard": False},
        "eval": {"max_new_tokens": max_new_tokens, "do_sample": False, "seeds": [seed], "batch_size": 50,
                 "select_by": "rouge_l", "valid_max_examples": 100, "misinstruction_max_examples": 1000},
    }


# ------------------------------------------------------------------------------------------------
# Results
# ------------------------------------------------------------------------------------------------


def _mean_std(values: list[float]) -> tuple[float, float]:
    if not values:
        return float("nan"), float("nan")
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def collect(task: str, task_dir: Path, methods: list[str], seeds: list[int]) -> dict[str, Any]:
    teacher_eval = json.loads((task_dir / "teacher" / "eval" / "eval.json").read_text())
    teacher_summary = json.loads((task_dir / "teacher" / "summary.json").read_text())
    out: dict[str, Any] = {
        "teacher": {
            "rouge_l": teacher_eval["rouge_l_mean"], "exact_match": teacher_eval["exact_match_mean"],
            "params": teacher_summary["student_params"], "train_time_s": teacher_summary["wall_time_s"],
            "steps": teacher_summary["step"],
        },
        "methods": {},
    }
    for method in methods:
        rows = []
        for seed in seeds:
            run = task_dir / "students" / method / f"seed{seed}"
            ev = json.loads((run / "eval" / "eval.json").read_text())
            sm = json.loads((run / "summary.json").read_text())
            rows.append({"seed": seed, "rouge_l": ev["rouge_l_mean"], "exact_match": ev["exact_match_mean"],
                         "valid_rouge_l": sm["best"]["value"], "best_step": sm["best"]["step"],
                         "train_time_s": sm["wall_time_s"], "params": sm["student_params"],
                         "per_category": ev.get("per_category"),
                         "teacher_misinstruction": sm["teacher_misinstruction"]})
            if sm["teacher_misinstruction"] is not None:
                out["teacher"]["misinstruction"] = sm["teacher_misinstruction"]
        rl, em = _mean_std([r["rouge_l"] for r in rows]), _mean_std([r["exact_match"] for r in rows])
        out["methods"][method] = {"rouge_l_mean": rl[0], "rouge_l_std": rl[1], "exact_match_mean": em[0],
                                  "exact_match_std": em[1], "runs": rows}
    return out


def markdown(results: dict[str, Any]) -> str:
    lines = []
    for task, res in results["tasks"].items():
        t = res["teacher"]
        mis = t.get("misinstruction", {})
        student_params = next(iter(res["methods"].values()))["runs"][0]["params"] if res["methods"] else None
        sample_seeds = results["settings"]["sizes"][task].get("sample_seeds")
        decoding = (f"sampling (temperature 1, top-p 1) over seeds {sample_seeds}, mean per run" if sample_seeds
                    else "greedy")
        lines.append(f"### {task}\n")
        lines.append(f"Test decoding: {decoding}; +- is the sample std over training seeds "
                     f"{results['settings']['seeds']}.\n")
        lines.append(
            f"Teacher {t['params'] / 1e6:.2f}M params ({t['steps']} steps), student "
            f"{(student_params or 0) / 1e6:.2f}M params; teacher token-level mis-instruction rate on the "
            f"training responses: {100 * mis.get('misinstruction_rate', float('nan')):.1f}% "
            f"({mis.get('n_tokens', 0)} tokens).\n"
        )
        lines.append("| model | test ROUGE-L | test exact match | valid ROUGE-L, greedy (selected ckpt) | train s/run |")
        lines.append("|---|---|---|---|---|")
        lines.append(f"| teacher | {t['rouge_l']:.2f} | {t['exact_match']:.2f} | | {t['train_time_s']:.0f} |")
        for method, m in res["methods"].items():
            vr = _mean_std([r["valid_rouge_l"] for r in m["runs"]])
            tt = statistics.fmean(r["train_time_s"] for r in m["runs"])
            lines.append(
                f"| {method} | {m['rouge_l_mean']:.2f} +- {m['rouge_l_std']:.2f} | {m['exact_match_mean']:.2f} +- "
                f"{m['exact_match_std']:.2f} | {vr[0]:.2f} +- {vr[1]:.2f} | {tt:.0f} |"
            )
        lines.append("")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# Main
# ------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--out", default=str(ROOT / "runs" / "lm_bench"),
                        help="output folder (default: runs/lm_bench; runs/lm_bench_quick with --quick)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run of the whole pipeline: fewer records and steps, one seed (~2-3 minutes); "
                             "its scores are too undertrained to compare methods")
    parser.add_argument("--tasks", default=",".join(ALL_TASKS),
                        help="comma-separated subset of: " + ", ".join(ALL_TASKS))
    parser.add_argument("--methods", default=None,
                        help="comma-separated lm-distill methods (default: " + ",".join(DEFAULT_METHODS)
                        + "; --quick: sft,kd,kd+loca); any of locakd's methods, e.g. jsd+loca")
    parser.add_argument("--seeds", default=None,
                        help="comma-separated training seeds of the students (default 0,1,2; --quick: 0)")
    parser.add_argument("--steps", type=int, default=None,
                        help="optimizer steps (batch 32) per student run, every task (default 210; --quick: 40 / 30)")
    parser.add_argument("--teacher-steps", type=int, default=None,
                        help="optimizer steps of each teacher's lm-sft run (default 600 instructions, 450 "
                             "shakespeare; --quick: 100 / 60)")
    parser.add_argument("--jobs", type=int, default=None,
                        help="runs in parallel, each in its own worker process (default: number of CPU cores, "
                             "at most 4); threads per job = cores / jobs")
    parser.add_argument("--shakespeare", default=None,
                        help="path to tinyshakespeare.txt (default: $LOCAKD_SHAKESPEARE, else "
                             "../shared/data/tinyshakespeare.txt next to the repository)")
    parser.add_argument("--force", action="store_true", help="delete --out first instead of reusing finished runs")
    args = parser.parse_args(argv)
    if args.quick and args.out == str(ROOT / "runs" / "lm_bench"):
        args.out = str(ROOT / "runs" / "lm_bench_quick")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sizes = QUICK if args.quick else FULL
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    unknown = [t for t in tasks if t not in ALL_TASKS]
    if unknown:
        raise SystemExit(f"run_lm_bench: unknown task(s) {unknown}; choose from {', '.join(ALL_TASKS)}")
    methods = [m.strip() for m in (args.methods or ",".join(("sft", "kd", "kd+loca") if args.quick
                                                            else DEFAULT_METHODS)).split(",") if m.strip()]
    from locakd.lm.config import method_spec

    for m in methods:
        method_spec(m)  # ConfigError for an unknown name
    seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else list(sizes["seeds"])
    cores = os.cpu_count() or 1
    jobs = args.jobs or max(1, min(cores, 4))
    threads = max(1, cores // jobs)

    shakespeare = Path(args.shakespeare or os.environ.get("LOCAKD_SHAKESPEARE") or DEFAULT_SHAKESPEARE)
    if "shakespeare" in tasks and not shakespeare.is_file():
        print(f"run_lm_bench: skipping task 'shakespeare': {shakespeare} not found "
              "(pass --shakespeare PATH or set LOCAKD_SHAKESPEARE)", file=sys.stderr)
        tasks.remove("shakespeare")
    if not tasks:
        raise SystemExit("run_lm_bench: no task left to run")

    out = Path(args.out).resolve()
    if args.force and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    cpu_started = _cpu_seconds()
    load_start = os.getloadavg() if hasattr(os, "getloadavg") else None
    steps = {t: args.steps or sizes[t]["steps"] for t in tasks}
    teacher_steps = {t: args.teacher_steps or sizes[t]["teacher_steps"] for t in tasks}
    print(f"run_lm_bench: tasks {tasks}, methods {methods}, seeds {seeds}, student steps {steps}, teacher steps "
          f"{teacher_steps}, {jobs} job(s) x {threads} thread(s) -> {out}", file=sys.stderr, flush=True)

    _init_worker(threads)
    pool = ProcessPoolExecutor(max_workers=jobs, initializer=_init_worker, initargs=(threads,)) if jobs > 1 else None

    def run_all(calls: list[tuple[Any, tuple]]) -> None:
        if pool is None:
            for fn, fn_args in calls:
                argv_, seconds = fn(*fn_args)
                print(f"  done in {seconds:6.1f}s: locakd {' '.join(argv_[:2])}", file=sys.stderr, flush=True)
            return
        futures = [pool.submit(fn, *fn_args) for fn, fn_args in calls]
        for fut in as_completed(futures):
            argv_, seconds = fut.result()
            print(f"  done in {seconds:6.1f}s: locakd {' '.join(argv_[:2])}", file=sys.stderr, flush=True)

    jobs_run = 0
    try:
        task_paths = {}
        for task in tasks:
            t0 = time.time()
            task_paths[task] = prepare_task(task, sizes[task], out / task, shakespeare)
            print(f"run_lm_bench: {task}: data + tokenizer ready ({time.time() - t0:.1f}s)", file=sys.stderr)

        # 1. teachers (lm-sft from scratch), then their test scores
        calls = []
        for task in tasks:
            paths, task_dir = task_paths[task], out / task
            n = teacher_steps[task]
            cfg = base_config(paths, task_dir / "teacher", steps=n, seed=0, lr=2e-3, batch=sizes[task]["batch"],
                              eval_every=_eval_every(n), max_new_tokens=sizes[task]["max_new_tokens"])
            cfg["model"]["student"] = str(paths["teacher_init"])
            job = plan_run(task_dir / "teacher", cfg, task_dir / "configs" / "teacher_sft.yaml", "lm-sft",
                           sizes[task]["sample_seeds"], task_dir / "logs" / "teacher.log")
            if job is not None:
                calls.append(job)
        jobs_run += len(calls)
        print(f"run_lm_bench: {len(calls)} teacher job(s)", file=sys.stderr, flush=True)
        run_all(calls)

        # 2. students: every method x seed
        calls = []
        for task in tasks:
            paths, task_dir = task_paths[task], out / task
            for method in methods:
                for seed in seeds:
                    run_dir = task_dir / "students" / method / f"seed{seed}"
                    n = steps[task]
                    cfg = base_config(paths, run_dir, steps=n, seed=seed, lr=2e-3, batch=sizes[task]["batch"],
                                      eval_every=_eval_every(n), max_new_tokens=sizes[task]["max_new_tokens"])
                    cfg["model"]["teacher"] = str(task_dir / "teacher" / "best")
                    cfg["method"]["name"] = method
                    job = plan_run(run_dir, cfg, task_dir / "configs" / f"student_{method}_seed{seed}.yaml",
                                   "lm-distill", sizes[task]["sample_seeds"],
                                   task_dir / "logs" / f"{method}_seed{seed}.log")
                    if job is not None:
                        calls.append(job)
        jobs_run += len(calls)
        print(f"run_lm_bench: {len(calls)} student job(s)", file=sys.stderr, flush=True)
        run_all(calls)
    finally:
        if pool is not None:
            pool.shutdown()

    results = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpu_count": cores, "python": platform.python_version(), "torch": _version("torch"),
                    "transformers": _version("transformers"), "load_avg_start": load_start,
                    "load_avg_end": os.getloadavg() if hasattr(os, "getloadavg") else None},
        "settings": {"tasks": tasks, "methods": methods, "seeds": seeds, "student_steps": steps,
                     "teacher_steps": teacher_steps, "jobs": jobs, "threads_per_job": threads,
                     "quick": args.quick, "sizes": {t: sizes[t] for t in tasks}, "teacher": TEACHER,
                     "student": STUDENT, "kd_ratio": 0.5, "loca_alpha": 0.9,
                     "temperature": 1.0},
        "tasks": {task: collect(task, out / task, methods, seeds) for task in tasks},
        "wall_time_s": round(time.time() - started, 1),
        "cpu_time_s": round(_cpu_seconds() - cpu_started, 1),
    }
    # every invocation on this --out, so a resumed / re-evaluated benchmark keeps its real cost on record
    previous = out / "results.json"
    history = json.loads(previous.read_text()).get("invocations", []) if previous.is_file() else []
    results["invocations"] = history + [{
        "command": results["command"], "jobs_run": jobs_run, "wall_time_s": results["wall_time_s"],
        "cpu_time_s": results["cpu_time_s"], "load_avg_start": load_start,
        "load_avg_end": results["machine"]["load_avg_end"], "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
    }]
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    table = markdown(results)
    timing = "\n".join(
        f"- `{inv['command']}`: {inv['jobs_run']} job(s), wall {inv['wall_time_s'] / 60:.1f} min, CPU "
        + (f"{inv['cpu_time_s'] / 60:.1f} min" if inv.get("cpu_time_s") is not None else "n/a")
        + f", load average (1/5/15 min) at start {_fmt_load(inv.get('load_avg_start'))}"
        + (f" ({inv['note']})" if inv.get("note") else "")
        for inv in results["invocations"]
    )
    (out / "results.md").write_text(
        f"Machine: {platform.platform()}, {cores} CPU core(s); {jobs} job(s) x {threads} thread(s); torch "
        f"{_version('torch')}, transformers {_version('transformers')}\n\nInvocations on this folder:\n"
        f"{timing}\n\n" + table
    )
    print(table)
    print(f"run_lm_bench: done in {results['wall_time_s'] / 60:.1f} min -> {out / 'results.md'}", file=sys.stderr)
    return 0


def _fmt_load(load: Any) -> str:
    return "n/a" if not load else "/".join(f"{x:.1f}" for x in load)


def _cpu_seconds() -> float:
    """User + system CPU time of this process and its finished children (the worker pool)."""
    import resource

    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def _eval_every(steps: int, n_evals: int = 3) -> int:
    """Validate about ``n_evals`` times, the last one at the final step."""
    return max(1, -(-steps // n_evals))


def _version(name: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(name)
    except Exception:  # pragma: no cover
        return None


if __name__ == "__main__":
    sys.exit(main())
