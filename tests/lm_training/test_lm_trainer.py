"""lm-sft / lm-distill / lm-eval: end to end, resume, vocabulary checks, config errors."""

from __future__ import annotations

import json
import re

import pytest
import torch
import yaml
from safetensors.torch import load_file

from locakd.cli.main import main
from locakd.engine.run import SUMMARY_KEYS
from locakd.errors import CheckpointError, ConfigError, DataError, InputError, NonFiniteLossError
from locakd.lm.config import LMExperimentConfig, load_lm_config, method_spec
from locakd.lm.models import create_causal_lm, tiny_gpt2_config
from locakd.lm.trainer import train_lm


def _config(lm_env, tmp_path, name="run", **sections) -> LMExperimentConfig:
    from locakd.config import from_dict

    return from_dict(LMExperimentConfig, lm_env.config(tmp_path / name, **sections))


def _weights(run_dir, which="final"):
    return load_file(str(run_dir / which / "model.safetensors"))


# ----------------------------------------------------------------------------------------------
# end to end through the CLI
# ----------------------------------------------------------------------------------------------


def test_sft_then_distill_then_eval(lm_env, tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    teacher_dir = tmp_path / "teacher"
    sft_cfg = lm_env.write_config(
        tmp_path / "sft.yaml", teacher_dir,
        model={"student": str(lm_env.teacher), "init": "pretrained", "teacher": None},
        method={"name": "sft"}, run={"tensorboard": True},
    )
    assert main(["lm-sft", str(sft_cfg)]) == 0
    for name in ("config.yaml", "metrics.jsonl", "summary.json", "last.pt", "tensorboard", "best", "final"):
        assert (teacher_dir / name).exists(), name
    student_dir = tmp_path / "student"
    kd_cfg = lm_env.write_config(tmp_path / "kd.yaml", student_dir,
                                 model={"teacher": str(teacher_dir / "best")})
    assert main(["lm-distill", str(kd_cfg)]) == 0
    summary = json.loads((student_dir / "summary.json").read_text())
    assert set(SUMMARY_KEYS) <= set(summary)  # the keys every pipeline writes
    assert summary["method"] == "kd+loca" and summary["status"] == "finished" and summary["step"] == 4
    mis = summary["teacher_misinstruction"]
    assert 0.0 <= mis["misinstruction_rate"] <= 1.0 and mis["n_tokens"] > 0
    records = [json.loads(line) for line in (student_dir / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in records if r["tag"] == "train"]
    assert [r["step"] for r in train_rows] == [1, 2, 3, 4]
    assert all({"loss", "ce", "kd", "lr", "grad_norm"} <= r.keys() for r in train_rows)
    assert [r["step"] for r in records if r["tag"] == "valid"] == [2, 4]

    for which in ("best", "final"):
        model = AutoModelForCausalLM.from_pretrained(student_dir / which)
        tokenizer = AutoTokenizer.from_pretrained(student_dir / which)
        ids = tokenizer("Instruction: Add the two numbers.", return_tensors="pt")["input_ids"]
        assert model(input_ids=ids).logits.shape[-1] == len(lm_env.tokenizer)
    assert yaml.safe_load((student_dir / "config.yaml").read_text())["method"]["name"] == "kd+loca"

    capsys.readouterr()
    assert main(["lm-eval", str(student_dir), "eval.seeds=[1,2]", "eval.do_sample=true"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    result = json.loads((student_dir / "eval" / "eval.json").read_text())
    assert result["rouge_l_mean"] == out["rouge_l_mean"] and len(result["per_seed"]) == 2
    assert 0.0 <= result["rouge_l_mean"] <= 100.0 and result["rouge_l_std"] >= 0.0
    assert "exact_match_mean" in result and "teacher_misinstruction" in result
    lines = (student_dir / "eval" / "generations.jsonl").read_text().splitlines()
    assert len(lines) == 2 * 8
    assert {"prompt", "reference", "output", "seed", "rouge_l", "exact_match"} <= json.loads(lines[0]).keys()

    # lm-eval on a config file evaluates model.student as it is
    assert main(["lm-eval", str(kd_cfg), f"model.student={student_dir / 'final'}", "model.init=pretrained",
                 "model.teacher=null", "--out", str(tmp_path / "eval_cfg")]) == 0
    result = json.loads((tmp_path / "eval_cfg" / "eval.json").read_text())
    assert result["model"] == str(student_dir / "final") and "teacher_misinstruction" not in result
    assert len((tmp_path / "eval_cfg" / "generations.jsonl").read_text().splitlines()) == 8


# ----------------------------------------------------------------------------------------------
# resume
# ----------------------------------------------------------------------------------------------


def test_resume_gives_the_same_weights_as_a_straight_run(lm_env, tmp_path):
    # dropout on, so the restored RNG state matters too
    init = tmp_path / "init_dropout"
    cfg = tiny_gpt2_config(len(lm_env.tokenizer), n_layer=1, n_embd=32, n_positions=96, dropout=0.1)
    cfg.save_pretrained(init)
    sections = dict(model={"student": str(init), "tokenizer": str(lm_env.student_init)},
                    optim={"max_steps": 4, "grad_accum_steps": 1},
                    run={"eval_every": 2, "save_every": 1})
    straight = _config(lm_env, tmp_path, "straight", **sections)
    train_lm(straight)
    split = _config(lm_env, tmp_path, "split", **sections)
    first = train_lm(split, stop_after_steps=3)
    assert first["status"] == "stopped" and first["step"] == 3 and first["final_model"] is None
    second = train_lm(split, resume=True)
    assert second["status"] == "finished" and second["step"] == 4
    a, b = _weights(tmp_path / "straight"), _weights(tmp_path / "split")
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0, msg=name)
    rows = [json.loads(line) for line in (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["tag"] == "train"] == [1, 2, 3, 4]
    assert [r["step"] for r in rows if r["tag"] == "valid"] == [2, 4]
    s1 = json.loads((tmp_path / "straight" / "summary.json").read_text())
    s2 = json.loads((tmp_path / "split" / "summary.json").read_text())
    assert s1["best"]["step"] == s2["best"]["step"]


def test_resume_guards(lm_env, tmp_path):
    config = _config(lm_env, tmp_path, optim={"max_steps": 2})
    with pytest.raises(CheckpointError, match="nothing to resume"):
        train_lm(config, resume=True)
    train_lm(config, stop_after_steps=1)
    with pytest.raises(ConfigError, match="already holds a run"):
        train_lm(config)
    changed = _config(lm_env, tmp_path, optim={"max_steps": 2, "lr": 1e-4})
    with pytest.raises(ConfigError, match="optim.lr"):
        train_lm(changed, resume=True)


# ----------------------------------------------------------------------------------------------
# vocabulary
# ----------------------------------------------------------------------------------------------


def test_vocab_mismatch_is_an_error_unless_cropped(lm_env, tmp_path):
    student = tmp_path / "student512"
    tiny_gpt2_config(512, n_layer=1, n_embd=32, n_positions=96).save_pretrained(student)
    teacher = tmp_path / "teacher520"
    create_causal_lm(tiny_gpt2_config(520, n_layer=1, n_embd=32, n_positions=96), seed=2).save_pretrained(teacher)
    lm_env.tokenizer.save_pretrained(teacher)  # same tokenizer, padded output layer: the size check decides
    sections = dict(model={"student": str(student), "teacher": str(teacher), "tokenizer": str(lm_env.student_init)},
                    optim={"max_steps": 2, "grad_accum_steps": 1}, run={"eval_every": 0})
    with pytest.raises(InputError, match=r"teacher 520, student 512.*crop_vocab"):
        train_lm(_config(lm_env, tmp_path, "mismatch", **sections))
    sections["model"]["crop_vocab"] = True
    summary = train_lm(_config(lm_env, tmp_path, "cropped", **sections))
    assert summary["vocab_size"] == 512 and summary["status"] == "finished"


def test_vocab_mismatch_error_through_the_cli(lm_env, tmp_path, capsys):
    teacher = tmp_path / "teacher520"
    create_causal_lm(tiny_gpt2_config(520, n_layer=1, n_embd=32, n_positions=96), seed=2).save_pretrained(teacher)
    lm_env.tokenizer.save_pretrained(teacher)
    cfg = lm_env.write_config(tmp_path / "c.yaml", tmp_path / "run", model={"teacher": str(teacher)})
    assert main(["lm-distill", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "error: teacher and student output vocabularies differ" in err and "Traceback" not in err


# ----------------------------------------------------------------------------------------------
# config errors
# ----------------------------------------------------------------------------------------------


def test_unknown_key_is_an_error(lm_env, tmp_path, capsys):
    cfg = lm_env.write_config(tmp_path / "c.yaml", tmp_path / "run", optim={"learning_rate": 1e-3})
    assert main(["lm-distill", str(cfg)]) == 2
    assert "unknown config key 'optim.learning_rate'" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="did you mean 'method.kd_ratio'"):
        load_lm_config(None, ["method.kd_rato=0.3"])


def test_unknown_method_is_an_error(lm_env, tmp_path, capsys):
    cfg = lm_env.write_config(tmp_path / "c.yaml", tmp_path / "run", method={"name": "kd+dkd"})
    assert main(["lm-distill", str(cfg)]) == 2
    assert "unknown method 'kd+dkd'" in capsys.readouterr().err
    for bad in ("sft+loca", "loca", "KD"):
        with pytest.raises(ConfigError, match="unknown method"):
            method_spec(bad)
    assert method_spec("skew-rkl+loca").divergence == "skew_reverse_kl"


def test_missing_jsonl_is_an_error(lm_env, tmp_path, capsys):
    cfg = lm_env.write_config(tmp_path / "c.yaml", tmp_path / "run", data={"train": str(tmp_path / "nope.jsonl")})
    assert main(["lm-distill", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "nope.jsonl" in err and "not found" in err
    with pytest.raises(DataError):
        train_lm(_config(lm_env, tmp_path, data={"valid": str(tmp_path / "missing_valid.jsonl")}))


def test_folder_without_tokenizer_is_an_error(lm_env, tmp_path):
    init = tmp_path / "no_tokenizer"
    tiny_gpt2_config(len(lm_env.tokenizer), n_layer=1, n_embd=32, n_positions=96).save_pretrained(init)
    with pytest.raises(DataError, match="tokenizer .* is empty"):
        train_lm(_config(lm_env, tmp_path, model={"student": str(init)}))


def test_command_and_setting_errors(lm_env, tmp_path):
    with pytest.raises(ConfigError, match="trains with method 'sft'"):
        load_lm_config(None, ["method.name=kd"], default_method="sft", require_method="sft")
    assert load_lm_config(None, [], default_method="sft", require_method="sft").method.name == "sft"
    with pytest.raises(ConfigError, match="unset model.teacher"):
        train_lm(_config(lm_env, tmp_path, method={"name": "sft"}), command="lm-sft")
    with pytest.raises(ConfigError, match="needs a teacher"):
        train_lm(_config(lm_env, tmp_path, model={"teacher": None}))
    with pytest.raises(ConfigError, match="positions"):
        train_lm(_config(lm_env, tmp_path, data={"max_length": 200, "max_prompt_length": 64}))
    with pytest.raises(ConfigError, match="float16 needs a GPU"):
        train_lm(_config(lm_env, tmp_path, run={"precision": "float16"}))
    with pytest.raises(ConfigError, match="fewer than one global batch"):
        train_lm(_config(lm_env, tmp_path, optim={"micro_batch_size": 64}))
    with pytest.raises(ConfigError, match="kd_ratio"):
        load_lm_config(None, ["method.kd_ratio=1.5"])
    with pytest.raises(ConfigError, match="max_prompt_length"):
        load_lm_config(None, ["data.max_length=16", "data.max_prompt_length=32"])


def test_a_non_finite_loss_is_a_one_line_error_naming_the_step(lm_env, tmp_path, capsys):
    cfg = lm_env.write_config(tmp_path / "c.yaml", tmp_path / "run", optim={"lr": 1e30, "grad_clip": None})
    assert main(["lm-distill", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert re.search(r"error: the training loss term '(ce|kd)' became (nan|inf) at optimizer step \d+", err), err
    with pytest.raises(NonFiniteLossError):
        train_lm(_config(lm_env, tmp_path, "api", optim={"lr": 1e30, "grad_clip": None}))


def test_bf16_autocast_runs_on_cpu(lm_env, tmp_path):
    summary = train_lm(_config(lm_env, tmp_path, run={"precision": "bfloat16", "eval_every": 0},
                               model={"teacher_dtype": "bfloat16"}, optim={"max_steps": 2}))
    assert summary["status"] == "finished"
    assert all(torch.isfinite(t).all() for t in _weights(tmp_path / "run").values())
