"""The run section every pipeline shares, and config.py's place below the engine."""

import dataclasses
import subprocess
import sys

from locakd.config import RunSection, config_keys
from locakd.image.config import ImageExperimentConfig
from locakd.lm.config import LMExperimentConfig


def test_both_pipelines_share_the_run_section_and_its_facts():
    shared = {f"run.{f.name}" for f in dataclasses.fields(RunSection)}
    for cls in (ImageExperimentConfig, LMExperimentConfig):
        assert issubclass(type(cls().run), RunSection)
        assert shared <= config_keys(cls)
        for resume in (True, False):
            assert config_keys(cls, resume=resume) & shared == config_keys(RunSection, resume=resume, prefix="run.")
        for identity in ("experiment", "run", "none"):
            assert config_keys(cls, identity=identity) & shared == config_keys(
                RunSection, identity=identity, prefix="run."
            )
    assert ImageExperimentConfig().run.out_dir == "" and LMExperimentConfig().run.out_dir == "runs/lm"


def test_config_does_not_import_the_engine_or_the_pipelines():
    code = "import sys, locakd.config; print(sorted(m for m in sys.modules if m.startswith('locakd.')))"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    for above in ("locakd.engine", "locakd.training", "locakd.image", "locakd.lm", "locakd.data"):
        assert above not in loaded, loaded
