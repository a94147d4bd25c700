"""run.engine=hf: the lm-distill YAML through transformers.Trainer (mapping, accelerate DDP, resume, data layouts,
LoRA, tokenizer check), beside the own loop on the same files."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch
from distributed_helpers import run_distributed
from safetensors.torch import load_file

from locakd.cli.main import main as cli_main
from locakd.config import from_dict
from locakd.engine.run import SUMMARY_KEYS
from locakd.errors import ConfigError, DataError, InputError
from locakd.lm.config import LMExperimentConfig
from locakd.lm.eval_command import run_lm_eval
from locakd.lm.trainer import train_lm

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

TIMEOUT_S = 240


def _config(hf_env, out_dir, **kwargs) -> LMExperimentConfig:
    return from_dict(LMExperimentConfig, hf_env.config(out_dir, **kwargs))


def _hf(run: dict | None = None, **values) -> dict:
    return {"engine": "hf", **(run or {}), **values}


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


# ------------------------------------------------------------------------------------------ mapping


def test_every_optim_and_run_key_maps_to_training_arguments(hf_env, tmp_path):
    from locakd.lm.hf_run import training_arguments

    config = _config(hf_env, tmp_path / "run", optim={
        "lr": 2e-4, "weight_decay": 0.05, "betas": [0.8, 0.95], "eps": 1e-6, "schedule": "cosine",
        "min_lr_ratio": 0.1, "warmup_steps": 0, "warmup_ratio": 0.25, "grad_clip": None, "micro_batch_size": 3, "grad_accum_steps": 5,
        "epochs": 2, "max_steps": 7,
    }, run=_hf(seed=11, log_every=3, eval_every=4, save_every=6, progress=False, dist_timeout_s=99.5),
        method={"name": "jsd+loca", "kd_ratio": 0.3, "loca_alpha": 0.85, "temperature": 1.5, "jsd_beta": 0.2,
                "skew_lambda": 0.3, "chunk_size": 16}, model={"crop_vocab": True, "teacher_dtype": "bfloat16"})
    args = training_arguments(config, has_valid=True)
    assert (args.learning_rate, args.weight_decay, args.adam_beta1, args.adam_beta2, args.adam_epsilon) == \
        (2e-4, 0.05, 0.8, 0.95, 1e-6)
    assert args.lr_scheduler_type == "cosine_with_min_lr" and args.lr_scheduler_kwargs == {"min_lr_rate": 0.1}
    assert args.warmup_steps == 0.25 and args.max_grad_norm == 0.0
    assert (args.per_device_train_batch_size, args.gradient_accumulation_steps) == (3, 5)
    assert (args.num_train_epochs, args.max_steps, args.dataloader_drop_last) == (2, 7, True)
    assert (args.seed, args.data_seed, args.use_cpu) == (11, 11, True)
    assert (args.logging_steps, args.eval_strategy, args.eval_steps) == (3, "steps", 4)
    assert (args.save_strategy, args.save_steps, args.save_total_limit) == ("steps", 6, 1)
    assert args.disable_tqdm and args.ddp_timeout == 100 and args.output_dir == str(tmp_path / "run")
    assert (args.method, args.kd_ratio, args.loca_alpha, args.temperature, args.jsd_beta, args.skew_lambda,
            args.chunk_size, args.crop_vocab, args.teacher_dtype) == \
        ("jsd+loca", 0.3, 0.85, 1.5, 0.2, 0.3, 16, True, "bfloat16")
    # eval_every 0: every epoch; save_every 0: with every validation; no validation set: neither
    config = _config(hf_env, tmp_path / "run", optim={"schedule": "constant", "warmup_steps": 3},
                     run=_hf(eval_every=0, save_every=0))
    args = training_arguments(config, has_valid=True)
    assert (args.eval_strategy, args.save_strategy, args.lr_scheduler_type, args.warmup_steps) == \
        ("epoch", "epoch", "constant_with_warmup", 3)
    assert training_arguments(config, has_valid=False).eval_strategy == "no"


@pytest.mark.parametrize("sections, message", [
    ({"run": _hf(device="cuda:1")}, r"run\.device='cuda:1'.*CUDA_VISIBLE_DEVICES"),
    ({"optim": {"schedule": "linear", "min_lr_ratio": 0.1}}, r"optim\.min_lr_ratio=0\.1 with optim\.schedule linear"),
    ({"run": _hf(precision="float16")}, r"run\.precision float16 needs a GPU"),
])
def test_keys_the_hf_engine_cannot_honour_are_errors(hf_env, tmp_path, sections, message):
    from locakd.lm.hf_run import training_arguments

    sections.setdefault("run", _hf())
    with pytest.raises(ConfigError, match=message):
        training_arguments(_config(hf_env, tmp_path / "run", **sections), has_valid=True)


def test_run_engine_is_documented_in_help(capsys):
    with pytest.raises(SystemExit):
        cli_main(["lm-distill", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "run.engine = 'own'" in text and "accelerate launch" in text and "model.lora.r = 0" in text


# ------------------------------------------------------------------------------------------ accelerate DDP


@pytest.mark.slow
@pytest.mark.parametrize("source", ["logits", "fused_lm_head", "teacher_cache"])
def test_accelerate_two_processes_give_the_weights_of_one_process_with_twice_the_batch(hf_env, tmp_path, source):
    """2 processes x 2 examples x 2 accumulation steps vs 1 process x 4 x 2: the same 8 examples per step,
    every response token weighted alike -> the same weights (up to float32 reduction order). With
    method.fused_lm_head on the two processes (the one-process run computes from the logits): the Trainer's
    DDP synchronises the head's gradient from the fused loss. With model.teacher_cache on both (the teacher
    folder gone): each process reads the cached rows of the examples its sampler shard hands it."""
    model = {}
    if source == "teacher_cache":
        from locakd.lm.cache_command import capture_teacher_cache

        capture_teacher_cache(from_dict(LMExperimentConfig, {
            **hf_env.config(tmp_path / "unused"), "cache": {"dir": str(tmp_path / "cache"), "top_k": 32}}))
        model = {"teacher": str(tmp_path / "no-such-teacher"), "teacher_cache": str(tmp_path / "cache")}
    one = _config(hf_env, tmp_path / "one", run=_hf(), optim={"micro_batch_size": 4, "grad_accum_steps": 2},
                  model=model)
    one_summary = train_lm(one)
    cfg = hf_env.write_config(tmp_path / "two.yaml", tmp_path / "two", run=_hf(), model=model,
                              optim={"micro_batch_size": 2, "grad_accum_steps": 2},
                              method={"name": "kd+loca", "chunk_size": 37, "fused_lm_head": source == "fused_lm_head"})
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
           "-m", "locakd.cli.main", "lm-distill", str(cfg)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    result = run_distributed(cmd, clean=[tmp_path / "two"], timeout=TIMEOUT_S, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    two_summary = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert two_summary["world_size"] == 2 and two_summary["global_batch_size"] == 8 == one_summary["global_batch_size"]
    assert two_summary["teacher_misinstruction"] == one_summary["teacher_misinstruction"]  # same tokens seen
    assert two_summary["tokens_trained"] == one_summary["tokens_trained"]
    a, b = _weights(tmp_path / "one" / "final"), _weights(tmp_path / "two" / "final")
    assert a.keys() == b.keys()
    for name in a:
        # 4 AdamW steps from identical gradients up to float32 reduction order (gloo all-reduce, other padding):
        # the same rtol/atol as the own loop's DDP test (tests/lm_training/test_ddp.py)
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-5, msg=name)


# ------------------------------------------------------------------------------------------ resume


def test_checkpoint_and_resume_continue_the_run_without_the_teacher(hf_env, tmp_path):
    full = _config(hf_env, tmp_path / "full", run=_hf(save_every=1))
    train_lm(full)
    config = _config(hf_env, tmp_path / "cut", run=_hf(save_every=1))
    stopped = train_lm(config, stop_after_steps=2)
    assert stopped["status"] == "stopped" and stopped["step"] == 2 and stopped["final_model"] is None
    checkpoint = tmp_path / "cut" / "checkpoint-2"
    student_keys = set(load_file(str(checkpoint / "model.safetensors")))
    teacher_keys = set(load_file(str(Path(hf_env.teachers["gpt2"]) / "model.safetensors")))
    assert "transformer.h.1.attn.c_attn.weight" in teacher_keys - student_keys  # the 2-layer teacher is not there
    weight_files = [p.name for p in checkpoint.iterdir() if p.suffix in (".safetensors", ".bin", ".pt", ".pth")]
    assert sorted(weight_files) == ["model.safetensors", "optimizer.pt", "rng_state.pth", "scheduler.pt",
                                    "training_args.bin"]
    n_student = sum(t.numel() for t in load_file(str(checkpoint / "model.safetensors")).values())
    n_optim = sum(v.numel() for s in torch.load(checkpoint / "optimizer.pt", weights_only=False)["state"].values()
                  for v in s.values() if torch.is_tensor(v) and v.dim() > 0)
    assert n_optim == 2 * n_student  # AdamW moments of the student only
    with pytest.raises(ConfigError, match="already holds a run"):
        train_lm(config)
    # the engine's run folder: what killed atomic writes left is removed when the run is resumed
    stale = [tmp_path / "cut" / ".best.k1ll3d_0.tmp", tmp_path / "cut" / ".summary.json.k1ll3d_0.tmp"]
    stale[0].mkdir()
    stale[1].write_text("{")
    resumed = train_lm(config, resume=True)
    assert resumed["status"] == "finished" and resumed["step"] == 4
    assert not any(path.exists() for path in stale)
    a, b = _weights(tmp_path / "full" / "final"), _weights(tmp_path / "cut" / "final")
    for name in a:
        assert torch.equal(a[name], b[name]), name  # same data position, RNG and optimizer state: bitwise
    rows = [json.loads(line) for line in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["tag"] == "train"] == [1, 2, 3, 4]  # one row per step, none repeated
    assert [r["step"] for r in rows if r["tag"] == "valid"] == [2, 4]
    full_summary = json.loads((tmp_path / "full" / "summary.json").read_text())
    assert resumed["best"]["step"] == full_summary["best"]["step"] and resumed["best"]["value"] == \
        full_summary["best"]["value"]  # the best validation so far came back from the checkpoint
    # the same summary keys as the own loop (locakd.engine.run.SUMMARY_KEYS); wall time over both sessions
    assert set(SUMMARY_KEYS) <= set(resumed) and "train_time_s" not in resumed and resumed["engine"] == "hf"
    assert resumed["wall_time_s"] > stopped["wall_time_s"] > 0
    with pytest.raises(ConfigError, match=r"cannot resume .*method\.name: 'kd\+loca' in the checkpoint, 'kd' now"):
        train_lm(_config(hf_env, tmp_path / "cut", run=_hf(save_every=1), method={"name": "kd"}), resume=True)


def test_resume_from_a_checkpoint_the_run_was_stopped_inside_of(hf_env, tmp_path):
    """Killed after the Trainer wrote checkpoint-N/ but before locakd's state went in: the run resumes, the best
    model so far is read from best/, and the result is the uninterrupted run's."""
    full = train_lm(_config(hf_env, tmp_path / "full", run=_hf(save_every=2)))
    config = _config(hf_env, tmp_path / "cut", run=_hf(save_every=2))
    train_lm(config, stop_after_steps=2)
    (tmp_path / "cut" / "checkpoint-2" / "locakd_state.json").unlink()
    from locakd.lm.hf_run import _TrainerRun

    run = _TrainerRun(config, out_dir=tmp_path / "cut", command="lm-distill", checkpoint_format="-",
                      position_key="step", resume=True)
    saved_best = json.loads((tmp_path / "cut" / "best" / "locakd_state.json").read_text())
    assert run.position == 2 and run.checkpoint["missing_state"]
    assert run.checkpoint["best"] == {"metric": "loss", "value": saved_best["value"], "step": 2,
                                      "loss": saved_best["loss"]}
    resumed = train_lm(config, resume=True)
    assert resumed["step"] == 4 and resumed["best"]["step"] == full["best"]["step"]
    assert resumed["best"]["value"] == full["best"]["value"]
    a, b = _weights(tmp_path / "full" / "final"), _weights(tmp_path / "cut" / "final")
    for name in a:
        assert torch.equal(a[name], b[name]), name


# ------------------------------------------------------------------------------------------ data layouts


def test_messages_and_prompt_completion_files_train_and_evaluate_end_to_end(hf_env, tmp_path, capsys):
    runs = {"messages": ("own", "llama"), "prompt_completion": ("hf", "gpt2")}
    for data, (engine, arch) in runs.items():
        out = tmp_path / data
        summary = train_lm(_config(hf_env, out, arch=arch, data=data, run={"engine": engine, "eval_every": 4},
                                   eval={"select_by": "rouge_l"}))
        assert summary["status"] == "finished" and summary["tokenization"]["format"] == data
        assert f"train {data} records, 64/64 examples kept" in capsys.readouterr().err  # named in the run log
        result = run_lm_eval(out)
        assert result["n_examples"] == 8 and 0.0 <= result["rouge_l_mean"] <= 100.0
        lines = [json.loads(line) for line in (out / "eval" / "generations.jsonl").read_text().splitlines()]
        if data == "messages":  # prompt: the chat up to the last assistant turn; reference: that turn
            assert all(line["prompt"].endswith("<|assistant|>\n") for line in lines)
        else:
            assert all(line["prompt"].startswith("Instruction: ") for line in lines)
        assert all("<|endoftext|>" not in line["reference"] for line in lines)


def test_a_file_that_mixes_layouts_is_an_error_naming_both_lines(hf_env, tmp_path):
    mixed = tmp_path / "mixed.jsonl"
    lines = Path(hf_env.dolly["train"]).read_text().splitlines()[:3] + \
        Path(hf_env.messages["train"]).read_text().splitlines()[:1]
    mixed.write_text("\n".join(lines) + "\n")
    for engine in ("own", "hf"):
        config = _config(hf_env, tmp_path / engine, data="dolly", run={"engine": engine})
        config.data.train = str(mixed)
        with pytest.raises(DataError, match=r"mixes data layouts: .*line 1 is 'dolly' but .*line 4 is 'messages'"):
            train_lm(config)


# ------------------------------------------------------------------------------------------ LoRA


@pytest.mark.parametrize("engine", ["own", "hf"])
def test_a_lora_student_trains_saves_an_adapter_reloads_and_evaluates(hf_env, tmp_path, engine):
    peft = pytest.importorskip("peft")
    from locakd.lm.models import load_causal_lm

    out = tmp_path / "lora"
    summary = train_lm(_config(hf_env, out, arch="llama", run={"engine": engine},
                               model={"student": str(hf_env.pretrained_students["llama"]), "init": "pretrained",
                                      "lora": {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}},
                               optim={"lr": 5e-2}))
    final = Path(summary["final_model"])
    assert (final / "adapter_config.json").is_file() and not (final / "model.safetensors").exists()
    adapter = load_file(str(final / "adapter_model.safetensors"))
    assert adapter and all("lora_" in name for name in adapter)
    assert any(float(t.abs().max()) > 0 for name, t in adapter.items() if "lora_B" in name)  # B starts at 0: trained
    assert summary["best"]["path"] is not None and (Path(summary["best"]["path"]) / "adapter_config.json").is_file()
    if engine == "hf":
        return  # loading and evaluating an adapter does not depend on the engine that trained it
    base = load_causal_lm(hf_env.pretrained_students["llama"])
    reloaded = peft.PeftModel.from_pretrained(base, str(final)).eval()
    ids = torch.tensor([[5, 17, 42, 7]])
    via_locakd = load_causal_lm(final).eval()  # adapter folder detected
    with torch.no_grad():
        torch.testing.assert_close(via_locakd(input_ids=ids).logits, reloaded(input_ids=ids).logits, rtol=0, atol=0)
        plain = load_causal_lm(hf_env.pretrained_students["llama"])  # from_pretrained above wrapped `base` in place
        assert not torch.equal(reloaded(input_ids=ids).logits, plain(input_ids=ids).logits)
    result = run_lm_eval(out, checkpoint="final")
    assert result["model"] == str(final) and result["n_examples"] == 8
    # an adapter folder given as model.student is evaluated too
    cfg = _config(hf_env, tmp_path / "eval_cfg", model={"student": str(final), "init": "pretrained"})
    cfg_path = tmp_path / "eval.yaml"
    from locakd.engine.io import save_config

    save_config(cfg, cfg_path)
    assert run_lm_eval(cfg_path, out_dir=tmp_path / "adapter_eval")["n_examples"] == 8


# ------------------------------------------------------------------------------------------ tokenizer check


@pytest.mark.parametrize("engine", ["own", "hf"])
def test_a_teacher_with_another_tokenizer_of_the_same_size_is_refused(hf_env, tmp_path, engine):
    from locakd.lm.models import load_tokenizer

    teacher = tmp_path / "teacher_other_tokenizer"
    for item in Path(hf_env.teachers["gpt2"]).iterdir():
        if item.name in ("config.json", "model.safetensors", "generation_config.json"):
            (teacher / item.name).parent.mkdir(exist_ok=True)
            (teacher / item.name).write_bytes(item.read_bytes())
    load_tokenizer(hf_env.other_tokenizer_dir).save_pretrained(teacher)
    config = _config(hf_env, tmp_path / "run", run={"engine": engine}, model={"teacher": str(teacher)})
    with pytest.raises(InputError, match=r"tokenizers differ.*vocabulary.*model\.check_tokenizer=false"):
        train_lm(config)
    assert not (tmp_path / "run" / "final").exists()
    config.model.check_tokenizer = False  # the explicit opt-out trains anyway (one step is enough to show it)
    config.optim.max_steps, config.data.valid = 1, None
    assert train_lm(config)["status"] == "finished"


def test_lm_sft_through_the_cli_on_the_hf_engine_keeps_stdout_for_the_result(hf_env, tmp_path, capsys):
    cfg = hf_env.write_config(tmp_path / "sft.yaml", tmp_path / "sft", run=_hf(), model={"teacher": None},
                              method={"name": "sft"}, optim={"max_steps": 2})
    assert cli_main(["lm-sft", str(cfg)]) == 0
    captured = capsys.readouterr()
    (line,) = captured.out.strip().splitlines()  # the result only: no Trainer log dicts on stdout
    result = json.loads(line)
    assert result["status"] == "finished" and result["step"] == 2 and result["teacher_misinstruction"] is None
    assert "accelerate NO" in captured.err  # the run log names the engine accelerate runs
    rows = [json.loads(x) for x in (tmp_path / "sft" / "metrics.jsonl").read_text().splitlines()]
    assert {r["tag"] for r in rows} == {"train", "valid"} and all("kd" not in r for r in rows)


def test_lora_keys_are_validated(hf_env, tmp_path):
    with pytest.raises(ConfigError, match="model.lora .* cannot be combined with model.init: scratch"):
        _config(hf_env, tmp_path, model={"lora": {"r": 4}})  # the fixture's student starts from scratch
    with pytest.raises(ConfigError, match=r"model\.lora\.dropout must be in \[0, 1\)"):
        _config(hf_env, tmp_path, model={"init": "pretrained", "lora": {"r": 4, "dropout": 1.0}})
    with pytest.raises(ConfigError, match="unknown config key 'model.lora.rank'"):
        _config(hf_env, tmp_path, model={"lora": {"rank": 4}})


def test_peft_refusing_this_environment_is_a_config_error(hf_env, tmp_path, monkeypatch):
    """peft raises ImportError for some installed optional backends (torchao < 0.16 with peft >= 0.18, as in
    the project's venv without the conftest fixture): LoRA then fails with a ConfigError saying so, whichever
    way the adapters are made (model.lora, DistillationTrainer(peft_config=...), an adapter folder loaded)."""
    peft = pytest.importorskip("peft")
    from locakd.lm.models import apply_lora, create_causal_lm, load_causal_lm, tiny_gpt2_config

    def refuse(*args, **kwargs):
        raise ImportError("Found an incompatible version of torchao")

    adapter = tmp_path / "adapter"
    base = load_causal_lm(hf_env.pretrained_students["llama"])
    apply_lora(base, 2).save_pretrained(adapter)  # before peft is made to refuse
    monkeypatch.setattr(peft, "get_peft_model", refuse)
    monkeypatch.setattr(peft.PeftModel, "from_pretrained", refuse)
    model = create_causal_lm(tiny_gpt2_config(300, n_layer=1, n_embd=32, n_positions=32), seed=0)
    with pytest.raises(ConfigError, match="peft cannot create LoRA layers in this environment: .*torchao"):
        apply_lora(model, 4)
    hf = pytest.importorskip("locakd.hf")
    args = hf.DistillationArguments(output_dir=str(tmp_path / "out"), use_cpu=True, report_to="none", method="sft")
    with pytest.raises(ConfigError, match="peft cannot create the adapters in this environment: .*torchao"):
        hf.DistillationTrainer(model=model, args=args, processing_class=hf_env.tokenizer,
                               peft_config=peft.LoraConfig(r=4, task_type="CAUSAL_LM"))
    with pytest.raises(ConfigError, match="peft cannot load LoRA layers in this environment: .*torchao"):
        load_causal_lm(adapter)
