"""Facts about config keys live on the keys (field metadata); every key list is derived from them."""

from dataclasses import dataclass, field

import pytest

from locakd.config import config_changes, config_keys, fill_defaults, flatten, option, to_dict
from locakd.image.config import ImageExperimentConfig
from locakd.lm.config import LMExperimentConfig


@dataclass
class _Inner:
    lr: float = option(0.1, "learning rate")
    epochs: int = option(10, "epochs", resume=True)


@dataclass
class _Run:
    seed: int = option(0, "seed", identity="run")
    device: str = option("cpu", "device", resume=True, identity="none")
    tags: list[str] = option(help="tags", factory=list, identity="none")


@dataclass
class _Config:
    optim: _Inner = field(default_factory=_Inner)
    run: _Run = field(default_factory=_Run)


def test_config_keys_select_by_metadata_at_any_depth():
    assert config_keys(_Config) == {"optim.lr", "optim.epochs", "run.seed", "run.device", "run.tags"}
    assert config_keys(_Config, resume=True) == {"optim.epochs", "run.device"}
    assert config_keys(_Config, resume=False) == {"optim.lr", "run.seed", "run.tags"}
    assert config_keys(_Config, identity="none") == {"run.device", "run.tags"}
    assert config_keys(_Config, identity=("run", "none")) == {"run.seed", "run.device", "run.tags"}
    assert config_keys(_Config, identity="experiment") == {"optim.lr", "optim.epochs"}


def test_option_rejects_an_unknown_identity():
    with pytest.raises(ValueError, match="identity"):
        option(1, "x", identity="sometimes")


def test_config_changes_is_recursive_and_respects_allowed_keys():
    saved = {"a": {"b": {"c": 1, "d": 2}}, "e": 3}
    current = {"a": {"b": {"c": 1, "d": 5}}, "e": 4, "f": 6}
    assert flatten(saved) == {"a.b.c": 1, "a.b.d": 2, "e": 3}
    changes = config_changes(saved, current, frozenset({"e"}))
    assert changes == ["a.b.d: 2 in the checkpoint, 5 now", "f: '<absent>' in the checkpoint, 6 now"]
    assert config_changes(saved, saved) == []


def test_fill_defaults_adds_missing_keys_at_any_depth_and_keeps_the_rest():
    saved = {"optim": {"epochs": 7, "extra": 1}, "run": {}}
    filled = fill_defaults(_Config, saved)
    assert filled == {"optim": {"lr": 0.1, "epochs": 7, "extra": 1}, "run": {"seed": 0, "device": "cpu", "tags": []}}
    assert saved == {"optim": {"epochs": 7, "extra": 1}, "run": {}}  # the argument is not modified
    assert fill_defaults(_Config, {}) == to_dict(_Config())
    assert config_changes(fill_defaults(_Config, {"run": {"seed": 3}}), to_dict(_Config())) == [
        "run.seed: 3 in the checkpoint, 0 now"]


def test_image_and_lm_configs_declare_their_resumable_and_non_identifying_keys():
    image_resume = config_keys(ImageExperimentConfig, resume=True)
    assert {"run.epochs", "run.device", "run.out_dir", "teacher.checkpoint"} <= image_resume
    assert "optim.lr" not in image_resume and "run.seed" not in image_resume
    assert config_keys(ImageExperimentConfig, identity="run") == {"run.seed", "run.eval_every"}
    lm_resume = config_keys(LMExperimentConfig, resume=True)
    assert {"optim.max_steps", "run.device", "eval.seeds"} <= lm_resume
    assert "method.loca_alpha" not in lm_resume and "run.seed" not in lm_resume
    # the Trainer integration's keys: the tokenizer check changes no result (it only refuses), so it may be
    # switched on resume; the engine and LoRA define the experiment and may not change (the two engines keep
    # different checkpoints and data orders; LoRA changes what is trained)
    assert "model.check_tokenizer" in lm_resume
    assert "model.check_tokenizer" in config_keys(LMExperimentConfig, identity="none")
    lm_fixed = {"run.engine", "model.lora.r", "model.lora.alpha", "model.lora.dropout", "model.lora.target_modules"}
    assert not lm_fixed & lm_resume and lm_fixed <= config_keys(LMExperimentConfig, identity="experiment")
