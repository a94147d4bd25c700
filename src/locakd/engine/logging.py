"""What a run reports: metrics JSONL, TensorBoard scalars, progress bars and messages.

Only the main process (rank 0) writes anything; other ranks get a logger whose methods do nothing,
so trainers need no ``if rank == 0`` around every call.

Resumption: the metrics file and the TensorBoard event files are append-only, so a run that was killed
after logging step ``s`` but before writing the checkpoint of ``s`` would log ``s`` again when resumed.
:meth:`RunLogger.keep_through` drops the rows after the checkpoint's position first, and the TensorBoard
writer is opened with ``purge_step`` = the first position logged again, which hides the earlier events
from that step on; every step then appears exactly once.
"""

from __future__ import annotations

import json
import math
import sys
import time
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from .io import atomic_write_text, save_config

__all__ = ["RunLogger", "read_metrics"]

T = TypeVar("T")


class RunLogger:
    def __init__(
        self,
        run_dir: str | Path,
        *,
        enabled: bool = True,
        tensorboard: bool = True,
        progress: bool = True,
        purge_step: int | None = None,
    ) -> None:
        """``purge_step``: the first step this session logs (TensorBoard hides older events from there on)."""
        self.run_dir = Path(run_dir)
        self.enabled = enabled
        self.show_progress = progress and enabled
        self._writer = None
        if not enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._writer = SummaryWriter(log_dir=str(self.run_dir / "tensorboard"), purge_step=purge_step)
            except ImportError:
                warnings.warn(
                    "tensorboard is not installed: scalars go to metrics.jsonl only "
                    "(pip install 'locakd[tensorboard]')",
                    stacklevel=2,
                )

    @property
    def metrics_path(self) -> Path:
        return self.run_dir / "metrics.jsonl"

    def save_config(self, config: Any) -> None:
        if self.enabled:
            save_config(config, self.run_dir / "config.yaml")

    def log(self, step: int, metrics: dict[str, float], *, tag: str = "epoch") -> None:
        """Append one JSON line (``{"tag":..., "step":..., **metrics}``) and the TensorBoard scalars."""
        if not self.enabled:
            return
        record = {"tag": tag, "step": step, "time": time.time(), **metrics}
        with self.metrics_path.open("a") as handle:
            handle.write(json.dumps(record) + "\n")
        if self._writer is not None:
            for name, value in metrics.items():
                if isinstance(value, (int, float)) and math.isfinite(value):
                    self._writer.add_scalar(f"{tag}/{name}", value, step)
            self._writer.flush()

    def keep_through(self, step: int | None) -> None:
        """Drop every metrics row logged after ``step`` (all of them for ``None``: a fresh start).

        A row cut short by a kill in the middle of its write (no newline, not valid JSON) goes too.
        """
        if not self.enabled or not self.metrics_path.exists():
            return
        kept = []
        if step is not None:
            for line in self.metrics_path.read_text().splitlines():
                try:
                    record = json.loads(line)
                except ValueError:
                    continue
                if isinstance(record, dict) and record.get("step", 0) <= step:
                    kept.append(line)
        atomic_write_text(self.metrics_path, "".join(f"{line}\n" for line in kept))

    def progress(self, iterable: Iterable[T], *, desc: str, total: int | None = None) -> Iterator[T]:
        if not self.show_progress:
            yield from iterable
            return
        from tqdm.auto import tqdm

        with tqdm(iterable, desc=desc, total=total, leave=False, file=sys.stderr, dynamic_ncols=True) as bar:
            yield from bar

    def info(self, message: str) -> None:
        if self.enabled:
            print(message, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
