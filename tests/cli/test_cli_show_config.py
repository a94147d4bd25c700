"""``locakd show-config image|lm``: every key with its default, and a YAML file of the defaults."""

from __future__ import annotations

import yaml

from locakd.cli.main import main
from locakd.config import describe, from_dict
from locakd.image.config import ImageExperimentConfig
from locakd.lm.config import LMExperimentConfig


def test_show_config_lists_every_image_key(capsys):
    assert main(["show-config", "image"]) == 0
    out = capsys.readouterr().out
    for line in describe(ImageExperimentConfig):
        assert line in out
    assert main(["show-config", "image", "--yaml"]) == 0
    parsed = yaml.safe_load(capsys.readouterr().out)
    assert from_dict(ImageExperimentConfig, parsed) == ImageExperimentConfig()


def test_show_config_lists_every_lm_key(capsys):
    assert main(["show-config", "lm"]) == 0
    out = capsys.readouterr().out
    for line in describe(LMExperimentConfig):
        assert line in out
    assert main(["show-config", "lm", "--yaml"]) == 0
    parsed = yaml.safe_load(capsys.readouterr().out)
    assert from_dict(LMExperimentConfig, parsed) == LMExperimentConfig()
