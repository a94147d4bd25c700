"""method.fused_lm_head on both engines: a run with the flag ends where the run without it ends (weights, logged
losses) up to float32 rounding, for GPT-2 (tied head) and Llama (untied), with LoCa and without; LoRA students
(frozen head, or a trainable copy of the head through peft's modules_to_save); refusals before training."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from locakd.config import from_dict
from locakd.errors import ConfigError
from locakd.lm.build import load_run_tokenizer, load_student, load_train_valid_records, tokenize
from locakd.lm.config import LMExperimentConfig
from locakd.lm.data import make_collate_fn
from locakd.lm.fused_head import HeadTap
from locakd.lm.models import load_causal_lm
from locakd.lm.trainer import train_lm

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

EPS32 = torch.finfo(torch.float32).eps

# every engine sees both architectures and both a LoCa method and another divergence
RUNS = [("own", "gpt2", "kd+loca"), ("own", "llama", "rkl"), ("hf", "gpt2", "rkl"), ("hf", "llama", "kd+loca")]


def _config(hf_env, out_dir: Path, engine: str, arch: str, method: str, fused: bool, **sections) -> LMExperimentConfig:
    sections.setdefault("optim", {"max_steps": 3})
    return from_dict(LMExperimentConfig, hf_env.config(
        out_dir, arch=arch, run={"engine": engine, "eval_every": 2}, method={"name": method, "fused_lm_head": fused},
        **sections))


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _head_sizes(model, batches) -> tuple[float, float]:
    """(e, max|z|) over ``batches``: a float32 logit is within e = 16 ulps of the size of its H products (the root
    of their sum of squares: they round independently) plus |b| of the exact one, however the product is blocked."""
    e = zmax = 0.0
    for batch in batches:
        with torch.no_grad(), HeadTap(model, "model") as tap:
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        head = tap.inputs(batch["input_ids"])
        h = head.hidden.detach().double().reshape(-1, head.hidden.shape[-1])
        w = head.weight.detach().double()
        bias = 0.0 if head.bias is None else head.bias.detach().double()
        size = (h ** 2 @ (w ** 2).T).sqrt().max() + (0.0 if head.bias is None else bias.abs().max())
        e, zmax = max(e, 16 * EPS32 * float(size)), max(zmax, float((h @ w.T + bias).abs().max()))
    return e, zmax


def _near_ties(teacher, batches, e: float) -> int:
    """Response tokens whose label logit is within 4 e of the teacher's best other logit: the only ones the fused
    and the unfused mis-instruction counts may disagree on (each path's logits are within e of the exact ones)."""
    count = 0
    for batch in batches:
        with torch.no_grad():
            z = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.double()[:, :-1]
        targets = batch["labels"][:, 1:]
        index = targets.clamp(min=0).unsqueeze(-1)
        margin = z.gather(-1, index).squeeze(-1) - z.scatter(-1, index, float("-inf")).amax(-1)
        count += int(((targets != -100) & (margin.abs() <= 4 * e)).sum())
    return count


def _rounding(config: LMExperimentConfig, final_dir: Path, tokens_per_step: float) -> tuple[float, float, int]:
    """(per-token loss error, relative gradient error) between a fused and an unfused step on the same weights,
    and the training tokens whose teacher mis-instruction may count either way (:func:`_near_ties`).

    As in tests/lm_training/test_fused_head.py: the two paths' logits differ by <= 2 e, each log-prob rounds by
    8 ulps of (max|z| + log V); a per-token term moves by <= 2 (2 lp + 2 e); d loss / d logits relatively by the
    same amount, summed over the step's tokens as a random walk, plus 64 ulps of reordering. e and max|z| are taken
    over the training examples for the initial and the final student and the teacher (the larger values)."""
    tok = load_run_tokenizer(config)
    examples = tokenize(config, load_train_valid_records(config).train, tok)
    collate = make_collate_fn(tok)
    batches = [collate([examples[i] for i in range(s, min(s + 16, len(examples)))]) for s in range(0, len(examples), 16)]
    models = [load_student(config, torch.device("cpu")), load_causal_lm(final_dir), load_causal_lm(config.model.teacher)]
    sizes = [_head_sizes(model.eval(), batches) for model in models]
    e, zmax = max(s[0] for s in sizes), max(s[1] for s in sizes)
    lp = 8 * EPS32 * (zmax + math.log(len(tok)))
    per_token = 2 * (2 * lp + 2 * e)
    return per_token, per_token * math.sqrt(tokens_per_step) + 64 * EPS32, _near_ties(models[2], batches, e)


def _adam_state(run_dir: Path, engine: str, model) -> dict[str, torch.Tensor]:
    """Bias-corrected second moments v per trainable parameter name, from the run's last checkpoint."""
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if engine == "own":
        state = torch.load(run_dir / "last.pt", weights_only=False)["optimizer"]
        # locakd.lm.build.make_optimizer: matrices first, then vectors
        ordered = [n for n, p in params if p.ndim >= 2] + [n for n, p in params if p.ndim < 2]
    else:
        (checkpoint,) = sorted(run_dir.glob("checkpoint-*"))
        state = torch.load(checkpoint / "optimizer.pt", weights_only=False)
        # transformers.Trainer.create_optimizer: the weight-decayed names first, then the others
        decay = set(transformers.Trainer.get_decay_parameter_names(None, model))
        ordered = [n for n, _ in params if n in decay] + [n for n, _ in params if n not in decay]
    beta2 = state["param_groups"][0]["betas"][1]
    out = {}
    for index, name in enumerate(ordered):
        adam = state["state"][index]
        out[name] = adam["exp_avg_sq"] / (1 - beta2 ** int(adam["step"]))
    return out


def _weight_tolerance(v: torch.Tensor, rho: float, lr: float, eps: float, steps: int) -> torch.Tensor:
    """Per element: a gradient that differs by at most rho G (G = sqrt(max v), the tensor's gradient scale) moves
    Adam's update m / (sqrt(v) + eps) by <= 2 rho G / (sqrt(v) + eps) (m and sqrt(v) are averages of the
    gradients, each moved by <= rho G), capped at the 2 a normalised update can change by; times lr per step."""
    scale = v.sqrt()
    return 2 * steps * lr * torch.clamp(rho * scale.max() / (scale + eps), max=1.0)


def _assert_same_run(hf_env, tmp_path, engine, arch, method, **sections):
    runs = {}
    for fused in (False, True):
        config = _config(hf_env, tmp_path / f"fused_{fused}", engine, arch, method, fused, **sections)
        runs[fused] = (config, train_lm(config))
    (config, plain), (_, fused) = runs[False], runs[True]
    assert plain["status"] == fused["status"] == "finished" and plain["tokens_trained"] == fused["tokens_trained"]
    steps = plain["step"]
    per_token, rho, near_ties = _rounding(config, Path(plain["final_model"]), plain["tokens_trained"] / steps)

    rows = {fused: [r for r in _rows(tmp_path / f"fused_{fused}")] for fused in (False, True)}
    assert [(r["tag"], r["step"]) for r in rows[False]] == [(r["tag"], r["step"]) for r in rows[True]]
    keys = ("loss", "ce", "kd", "teacher_misinstruction_rate")
    for a, b in zip(rows[False], rows[True], strict=True):
        for key in (k for k in keys if k in a):
            if key == "teacher_misinstruction_rate":  # a rate over >= 1 step's tokens; only near ties may differ
                assert abs(b[key] - a[key]) * plain["tokens_trained"] / steps <= near_ties, (a, b)
                continue
            # step 1 runs on the same weights: only the per-token rounding. Later the weights differ by at most a
            # fraction rho of the updates (see _weight_tolerance), which moves a loss by at most rho of itself
            tol = per_token + (0.0 if a["step"] == 1 and a["tag"] == "train" else rho * abs(a[key]))
            assert math.isclose(b[key], a[key], rel_tol=0, abs_tol=tol), (key, a, b, tol)

    # the student as it trained (LoRA-wrapped when model.lora is set): its trainable names, in the optimizer's order
    adam = _adam_state(tmp_path / "fused_False", engine, load_student(config, torch.device("cpu")))
    adam = {name.replace(".default", ""): v for name, v in adam.items()}  # peft saves adapters without their name
    files = ("adapter_model.safetensors", "model.safetensors")
    name = next(f for f in files if (Path(plain["final_model"]) / f).is_file())
    a, b = load_file(str(Path(plain["final_model"]) / name)), load_file(str(Path(fused["final_model"]) / name))
    assert a.keys() == b.keys() and a.keys() <= adam.keys(), sorted(set(a) - set(adam))[:3]
    o = config.optim
    checked = 0
    for key in a:
        excess = (b[key] - a[key]).abs() - _weight_tolerance(adam[key], rho, o.lr, o.eps, steps)
        assert bool((excess <= 0).all()), (key, float(excess.max()))
        checked += 1
    assert checked
    return a, b


@pytest.mark.parametrize("engine, arch, method", RUNS)
def test_a_fused_run_ends_where_the_unfused_run_ends(hf_env, tmp_path, engine, arch, method):
    a, b = _assert_same_run(hf_env, tmp_path, engine, arch, method)
    head = "transformer.wte.weight" if arch == "gpt2" else "lm_head.weight"  # GPT-2's head is the tied embedding
    assert not torch.equal(a[head], load_file(str(Path(hf_env.teachers[arch]) / "model.safetensors")).get(head))


def test_a_lora_student_with_a_frozen_head(hf_env, tmp_path):
    pytest.importorskip("peft")
    a, _ = _assert_same_run(hf_env, tmp_path, "own", "llama", "kd+loca", model={
        "student": str(hf_env.pretrained_students["llama"]), "init": "pretrained",
        "lora": {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}}, optim={"max_steps": 3, "lr": 5e-2})
    assert a and all("lora_" in name for name in a)


def test_the_trainer_with_a_trainable_head_copy_through_modules_to_save(hf_env, tmp_path):
    """peft_config with modules_to_save=["lm_head"]: the head is wrapped, its trainable copy gets the fused
    gradient; one Trainer step's logged terms and gradients equal the unfused step's."""
    peft = pytest.importorskip("peft")
    hf = pytest.importorskip("locakd.hf")
    from test_hf_trainer import _args, _examples, _GradCapture

    results = {}
    for fused in (False, True):
        torch.manual_seed(0)  # peft draws the adapters' initial weights from the global generator
        capture = _GradCapture()
        lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], modules_to_save=["lm_head"],
                               task_type="CAUSAL_LM")
        trainer = hf.DistillationTrainer(model=str(hf_env.pretrained_students["llama"]),
                                         teacher_model=str(hf_env.teachers["llama"]),
                                         args=_args(tmp_path / str(fused), fused_lm_head=fused),
                                         train_dataset=_examples(hf_env), callbacks=[capture], peft_config=lora)
        trainer.train()
        results[fused] = (trainer.state.log_history[0], capture.grads)
    (log_a, grads_a), (log_b, grads_b) = results[False], results[True]
    assert any("modules_to_save" in name and "lm_head" in name for name in grads_b)
    assert grads_a.keys() == grads_b.keys()
    config = from_dict(LMExperimentConfig, hf_env.config(tmp_path / "x", arch="llama"))
    config.model.student = str(hf_env.pretrained_students["llama"])
    config.model.init = "pretrained"
    tokens = 8 * 64.0  # 8 examples of at most 64 tokens
    per_token, rho, near_ties = _rounding(config, Path(hf_env.pretrained_students["llama"]), tokens)
    for key in ("loss", "ce", "kd"):
        assert math.isclose(log_b[key], log_a[key], rel_tol=0, abs_tol=per_token), key
    if not near_ties:
        assert log_b["teacher_misinstruction_rate"] == log_a["teacher_misinstruction_rate"]
    for name, grad in grads_a.items():
        torch.testing.assert_close(grads_b[name], grad, rtol=0, atol=rho * float(grad.abs().max()), msg=name)


def test_models_the_fused_path_cannot_compute_are_refused_before_training(hf_env, tmp_path):
    hf = pytest.importorskip("locakd.hf")
    from test_hf_trainer import _args, _examples

    from locakd.lm.models import create_causal_lm

    gemma = transformers.Gemma2Config(vocab_size=len(hf_env.tokenizer), hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                                      bos_token_id=0, eos_token_id=0, pad_token_id=0)
    with pytest.raises(ConfigError, match=r"method\.fused_lm_head .*final_logit_softcapping=30\.0"):
        hf.DistillationTrainer(model=create_causal_lm(gemma, seed=0), teacher_model=create_causal_lm(gemma, seed=1),
                               args=_args(tmp_path, fused_lm_head=True, check_tokenizer=False),
                               train_dataset=_examples(hf_env), processing_class=hf_env.tokenizer)
    with pytest.raises(ConfigError, match=r"method\.fused_lm_head fuses the divergence .* method 'sft'"):
        _config(hf_env, tmp_path / "sft", "own", "gpt2", "sft", True)
