"""Tiny MNIST-1D configs written to YAML for the CLI tests."""

from __future__ import annotations

from pathlib import Path

import yaml


def write_config(path: Path, mnist_root: Path, out_dir: Path, **sections) -> Path:
    data = {
        "data": {"name": "mnist1d", "root": str(mnist_root), "batch_size": 32, "mnist1d_samples": 300},
        "student": {"name": "mnist1d_mlp_32"},
        "method": {"name": "ce", "ce_weight": 1.0},
        "optim": {"milestones": [1]},
        "run": {
            "epochs": 1,
            "device": "cpu",
            "out_dir": str(out_dir),
            "progress": False,
            "tensorboard": False,
        },
    }
    for section, values in sections.items():
        data.setdefault(section, {}).update(values)
    path.write_text(yaml.safe_dump(data))
    return path
