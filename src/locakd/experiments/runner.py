"""Run many image-trainer experiments: resumable, dependency-aware, in parallel worker processes.

A :class:`RunSpec` is one call of :func:`~locakd.image.trainer.train_teacher` or
:func:`~locakd.image.trainer.distill`: a list of ``key=value`` config overrides plus a
run folder. :func:`run_specs` executes a list of them:

* a run whose folder already holds ``summary.json`` is **skipped** (its summary is read back),
  after checking that the folder's ``config.yaml`` is the same experiment (otherwise
  :class:`~locakd.errors.ConfigError`: a changed setting must not silently reuse old results);
* a run whose folder holds ``last.pt`` but no ``summary.json`` (interrupted) is **resumed**;
* ``after`` names the run that must finish first (a student waits for its teacher); runs
  whose dependency failed are reported as failed without starting;
* with ``workers > 1`` runs execute in that many ``spawn`` worker processes, each with
  ``torch.set_num_threads(1)`` (small models on a few cores run faster side by side than
  with intra-op threads); ``workers <= 1`` runs them in this process, also with
  ``threads_per_worker`` torch threads (the previous setting is restored afterwards);
* each run's console output (the trainer's per-epoch lines, warnings) goes to
  ``<run folder>/train.log``; one overall tqdm bar (stderr) counts finished runs.

Results come back as ``{key: RunResult}``; failures do not stop the other runs.
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
import traceback
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from .machine import available_cores

__all__ = [
    "MODES",
    "RunResult",
    "RunSpec",
    "check_same_experiment",
    "default_workers",
    "execute_spec",
    "finished_results",
    "run_specs",
]

MODES = ("train-teacher", "distill")


@dataclass
class RunSpec:
    """One training run.

    Attributes:
        key: unique name of the run (used for ``after`` and in the results).
        mode: ``"train-teacher"`` or ``"distill"``.
        out_dir: the run folder (becomes ``run.out_dir``).
        overrides: ``key=value`` config overrides applied to the default
            :class:`~locakd.image.config.ImageExperimentConfig`.
        after: key of a run that must finish successfully before this one starts.
        meta: free labels kept with the result (pair, method, variant, seed, ...).
    """

    key: str
    mode: str
    out_dir: str
    overrides: tuple[str, ...] = ()
    after: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(f"RunSpec {self.key!r}: mode must be one of {MODES}, got {self.mode!r}")
        self.overrides = tuple(self.overrides)

    def config(self):
        """The resolved :class:`~locakd.image.config.ImageExperimentConfig`."""
        from ..image.config import load_image_config

        return load_image_config(None, [*self.overrides, f"run.out_dir={self.out_dir}"])

    @property
    def summary_path(self) -> Path:
        return Path(self.out_dir) / "summary.json"


@dataclass
class RunResult:
    """What became of one :class:`RunSpec`.

    Attributes:
        key: the spec's key.
        status: ``"ran"``, ``"resumed"`` (continued from ``last.pt``), ``"skipped"`` (its folder
            already held a finished run) or ``"failed"``.
        summary: the run's ``summary.json`` (``None`` when it failed).
        wall_s: seconds this call spent on it (0 for a skipped run).
        error: one line saying why it failed, with the path of its ``train.log``.
        meta: the spec's labels.
    """

    key: str
    status: str
    summary: dict[str, Any] | None
    wall_s: float
    error: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.status != "failed"

    def metric(self, name: str) -> float | None:
        """``summary[name]`` as a float; ``None`` for a failed run or a summary without it."""
        if not self.ok or self.summary is None:
            return None
        value = self.summary.get(name)
        return None if value is None else float(value)


def check_same_experiment(spec: RunSpec) -> None:
    """Raise ConfigError if ``spec.out_dir/config.yaml`` describes a different experiment than ``spec``."""
    import yaml

    from ..config import config_keys, fill_defaults, flatten, to_dict
    from ..image.config import ImageExperimentConfig

    saved_path = Path(spec.out_dir) / "config.yaml"
    if not saved_path.is_file():
        return
    # keys added to locakd after the run was written count as their defaults
    saved = flatten(fill_defaults(ImageExperimentConfig, yaml.safe_load(saved_path.read_text()) or {}))
    # Round-trip through YAML so that tuples / floats compare as they were written.
    current = flatten(yaml.safe_load(yaml.safe_dump(to_dict(spec.config()), sort_keys=False)))
    # Keys that change no result (paths, device, logging) may differ; the seed may not.
    reusable = config_keys(ImageExperimentConfig, identity="none")
    diffs = [
        f"{k}: {saved.get(k, '<absent>')!r} there, {current.get(k, '<absent>')!r} now"
        for k in sorted(set(saved) | set(current))
        if k not in reusable and saved.get(k) != current.get(k)
    ]
    if diffs:
        raise ConfigError(
            f"run folder {spec.out_dir} holds a different experiment ({'; '.join(diffs[:4])}"
            f"{'; ...' if len(diffs) > 4 else ''}); use another output folder or delete it"
        )


def _read_summary(spec: RunSpec) -> dict[str, Any] | None:
    if not spec.summary_path.is_file():
        return None
    check_same_experiment(spec)
    return json.loads(spec.summary_path.read_text())


def finished_results(specs: Iterable[RunSpec]) -> dict[str, RunResult]:
    """``{key: RunResult}`` (status ``"skipped"``) of the specs whose run folder holds a finished run.

    Trains nothing; like :func:`run_specs`, a folder holding a different experiment is a
    :class:`~locakd.errors.ConfigError`.
    """
    results = {}
    for spec in specs:
        summary = _read_summary(spec)
        if summary is not None:
            results[spec.key] = RunResult(spec.key, "skipped", summary, 0.0, meta=spec.meta)
    return results


def default_workers(limit: int = 2) -> int:
    """Worker processes to use by default: the available cores, at most ``limit``, at least 1."""
    return max(1, min(limit, available_cores()))


def execute_spec(spec: RunSpec) -> RunResult:
    """Run (or skip / resume) one spec in this process; never raises for a failed run."""
    t0 = time.time()
    try:
        summary = _read_summary(spec)
        if summary is not None:
            return RunResult(spec.key, "skipped", summary, 0.0, meta=spec.meta)
        from ..image.trainer import distill, train_teacher

        cfg = spec.config()
        out = Path(spec.out_dir)
        resume = (out / "last.pt").is_file()
        if resume:
            check_same_experiment(spec)
        out.mkdir(parents=True, exist_ok=True)
        fn = train_teacher if spec.mode == "train-teacher" else distill
        with (
            open(out / "train.log", "a") as log,
            contextlib.redirect_stderr(log),
            contextlib.redirect_stdout(log),
        ):
            summary = fn(cfg, resume=resume)
        return RunResult(spec.key, "resumed" if resume else "ran", summary, time.time() - t0, meta=spec.meta)
    except Exception as err:  # noqa: BLE001 - reported, the other runs go on
        detail = "".join(traceback.format_exception_only(type(err), err)).strip()
        log = Path(spec.out_dir) / "train.log"
        try:
            with open(log, "a") as handle:
                handle.write(traceback.format_exc())
        except OSError:
            pass
        return RunResult(
            spec.key, "failed", None, time.time() - t0, error=f"{detail} (log: {log})", meta=spec.meta
        )


def _init_worker(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    with contextlib.suppress(RuntimeError):  # already set in this process
        torch.set_num_interop_threads(1)


def _check_specs(specs: Sequence[RunSpec]) -> None:
    keys = [s.key for s in specs]
    if len(set(keys)) != len(keys):
        dupes = sorted({k for k in keys if keys.count(k) > 1})
        raise ConfigError(f"duplicate run keys: {dupes[:5]}")
    dirs = [str(Path(s.out_dir).resolve()) for s in specs]
    if len(set(dirs)) != len(dirs):
        raise ConfigError("two runs share one output folder")
    known = set(keys)
    for s in specs:
        if s.after is not None and s.after not in known:
            raise ConfigError(f"run {s.key!r} waits for unknown run {s.after!r}")
        s.config()  # a bad override fails here, before any work


def run_specs(
    specs: Iterable[RunSpec],
    *,
    workers: int = 1,
    threads_per_worker: int = 1,
    progress: bool = True,
    desc: str = "runs",
    on_result: Callable[[RunResult], None] | None = None,
) -> dict[str, RunResult]:
    """Execute ``specs`` (see the module doc); returns ``{key: RunResult}`` in spec order.

    Runs are started in list order as soon as their ``after`` dependency is done, so put
    teachers first.
    """
    specs = list(specs)
    _check_specs(specs)
    results: dict[str, RunResult] = {}

    from tqdm.auto import tqdm

    bar = tqdm(
        total=len(specs), desc=desc, unit="run", disable=not progress, file=sys.stderr, dynamic_ncols=True
    )

    def record(res: RunResult) -> None:
        results[res.key] = res
        if res.status == "failed":
            bar.write(f"run {res.key} failed: {res.error}", file=sys.stderr)
        else:
            bar.set_postfix_str(f"{res.key} {res.status}", refresh=False)
        bar.update(1)
        if on_result is not None:
            on_result(res)

    # Finished runs are read here, without a worker.
    for res in finished_results(specs).values():
        record(res)

    def ready(s: RunSpec) -> bool | None:
        """True: can start; False: wait; None: its dependency failed."""
        if s.after is None:
            return True
        dep = results.get(s.after)
        if dep is None:
            return False
        return True if dep.ok else None

    todo = [s for s in specs if s.key not in results]
    threads_before = None
    try:
        if workers <= 1 and todo:
            # Small models on a busy CPU run several times faster with one intra-op thread
            # (OpenMP threads of an oversubscribed process mostly wait); restored afterwards.
            import torch

            threads_before = torch.get_num_threads()
            torch.set_num_threads(threads_per_worker)
            while todo:
                progressed = False
                for s in list(todo):
                    state = ready(s)
                    if state is False:
                        continue
                    todo.remove(s)
                    progressed = True
                    if state is None:
                        record(
                            RunResult(
                                s.key, "failed", None, 0.0, error=f"dependency {s.after} failed", meta=s.meta
                            )
                        )
                    else:
                        record(execute_spec(s))
                if not progressed:  # pragma: no cover - _check_specs rules out unknown deps; cycles remain
                    raise ConfigError(f"runs wait on each other in a cycle: {[s.key for s in todo][:5]}")
        elif todo:
            import multiprocessing

            ctx = multiprocessing.get_context("spawn")
            with ProcessPoolExecutor(
                max_workers=workers, mp_context=ctx, initializer=_init_worker, initargs=(threads_per_worker,)
            ) as pool:
                running: dict[Future, RunSpec] = {}
                try:
                    while todo or running:
                        for s in list(todo):
                            state = ready(s)
                            if state is False:
                                continue
                            todo.remove(s)
                            if state is None:
                                record(
                                    RunResult(
                                        s.key,
                                        "failed",
                                        None,
                                        0.0,
                                        error=f"dependency {s.after} failed",
                                        meta=s.meta,
                                    )
                                )
                            else:
                                running[pool.submit(execute_spec, s)] = s
                        if not running:
                            if todo:  # pragma: no cover - cycle
                                raise ConfigError(
                                    f"runs wait on each other in a cycle: {[s.key for s in todo][:5]}"
                                )
                            break
                        done, _ = wait(running, return_when=FIRST_COMPLETED)
                        for fut in done:
                            s = running.pop(fut)
                            try:
                                record(fut.result())
                            except Exception as err:  # noqa: BLE001 - e.g. a worker killed by the OS
                                record(RunResult(s.key, "failed", None, 0.0, error=repr(err), meta=s.meta))
                except BaseException:
                    pool.shutdown(wait=False, cancel_futures=True)
                    raise
    finally:
        bar.close()
        if threads_before is not None:
            import torch

            torch.set_num_threads(threads_before)
    return {s.key: results[s.key] for s in specs if s.key in results}
