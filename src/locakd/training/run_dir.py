"""The run directory: resolved config, metrics JSONL, TensorBoard scalars, progress bars.

Only the main process (rank 0) writes anything; other ranks get a logger whose
methods do nothing, so trainers need no ``if rank == 0`` around every call.
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

from ..config import save_config

T = TypeVar("T")


class RunLogger:
    def __init__(
        self,
        run_dir: str | Path,
        *,
        enabled: bool = True,
        tensorboard: bool = True,
        progress: bool = True,
    ) -> None:
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

                self._writer = SummaryWriter(log_dir=str(self.run_dir / "tensorboard"))
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

    def truncate_metrics_after(self, step: int, tag: str = "epoch") -> None:
        """On resume, drop records logged after the checkpoint (they will be logged again)."""
        if not self.enabled or not self.metrics_path.exists():
            return
        kept = []
        for line in self.metrics_path.read_text().splitlines():
            if not line.strip():
                continue
            record = json.loads(line)
            if record.get("tag") == tag and record.get("step", 0) > step:
                continue
            kept.append(line)
        from .checkpoint import atomic_write_text

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
