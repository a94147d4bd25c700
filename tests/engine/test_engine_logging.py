"""RunLogger: one metrics row per step after a resume, torn rows dropped, TensorBoard purge on resume."""

from __future__ import annotations

import json

import pytest

from locakd.engine.logging import RunLogger, read_metrics


def test_keep_through_drops_rows_after_the_checkpoint_and_a_torn_last_row(tmp_path):
    logger = RunLogger(tmp_path, tensorboard=False, progress=False)
    logger.log(0, {"teacher_top1": 50.0}, tag="teacher")
    for step in (1, 2, 3):
        logger.log(step, {"loss": float(step)}, tag="train")
    logger.log(2, {"loss": 0.5}, tag="valid")
    with logger.metrics_path.open("a") as handle:  # a kill in the middle of a row
        handle.write('{"tag": "train", "step": 4, "lo')
    logger.keep_through(2)
    assert [(r["tag"], r["step"]) for r in read_metrics(logger.metrics_path)] == [
        ("teacher", 0), ("train", 1), ("train", 2), ("valid", 2)
    ]
    logger.keep_through(None)  # a fresh start in a folder an aborted run left
    assert logger.metrics_path.read_text() == ""
    RunLogger(tmp_path, enabled=False).keep_through(None)  # other ranks do nothing


def test_tensorboard_purge_step_hides_the_repeated_steps(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    first = RunLogger(tmp_path, progress=False)
    for step in (1, 2, 3):
        first.log(step, {"loss": float(step)}, tag="train")
    first.close()
    # killed after logging step 3 with the checkpoint of step 2: the resumed session logs 3 again
    resumed = RunLogger(tmp_path, progress=False, purge_step=3)
    for step in (3, 4):
        resumed.log(step, {"loss": 10.0 * step}, tag="train")
    resumed.close()
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    scalars = [(e.step, e.value) for e in events.Scalars("train/loss")]
    assert scalars == [(1, 1.0), (2, 2.0), (3, 30.0), (4, 40.0)]
    assert [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [
        1, 2, 3, 3, 4
    ]  # the metrics file is trimmed by keep_through (called by Run.begin), not by the writer
