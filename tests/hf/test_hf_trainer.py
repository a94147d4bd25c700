"""locakd.hf.DistillationTrainer: the lm-distill objective inside transformers.Trainer."""

from __future__ import annotations

import copy

import pytest
import torch

from locakd.errors import ConfigError, InputError
from locakd.lm.data import PromptTemplate, load_instruction_records, make_collate_fn, tokenize_examples
from locakd.lm.models import load_causal_lm, load_tokenizer

hf = pytest.importorskip("locakd.hf")
transformers = pytest.importorskip("transformers")

EPS32 = torch.finfo(torch.float32).eps


def _args(tmp_path, **kwargs):
    base = dict(output_dir=str(tmp_path / "out"), use_cpu=True, report_to="none", disable_tqdm=True,
                save_strategy="no", logging_steps=1, per_device_train_batch_size=4, gradient_accumulation_steps=2,
                max_steps=1, learning_rate=1e-3, max_grad_norm=0.0, chunk_size=37, max_length=64,
                max_prompt_length=48, prompt_template="compact")
    base.update(kwargs)
    return hf.DistillationArguments(**base)


def _examples(hf_env, n=8):
    records = load_instruction_records(hf_env.dolly["train"])[:n]
    return tokenize_examples(records, hf_env.tokenizer, max_length=64, max_prompt_length=48,
                             template=PromptTemplate.from_config("compact"))


class _GradCapture(transformers.TrainerCallback):
    def __init__(self):
        self.grads = None

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("method", ["kd+loca", "rkl"])
def test_one_trainer_step_equals_the_lm_distill_objective(hf_env, tmp_path, arch, method):
    """One optimizer step of 2 micro-batches x 4 examples: the Trainer's loss, CE / KD terms and gradients equal
    lm-distill's objective and accumulate_gradients over the same 8 examples as ONE batch -- the
    num_items_in_batch normalisation weighs every response token equally across micro-batches."""
    from locakd.lm.trainer import accumulate_gradients
    from locakd.losses.objectives import LMObjective

    examples = _examples(hf_env)
    student = load_causal_lm(hf_env.pretrained_students[arch])
    teacher = load_causal_lm(hf_env.teachers[arch])
    reference = copy.deepcopy(student).train()
    args = _args(tmp_path, method=method, kd_ratio=0.4, loca_alpha=0.8, temperature=2.0)
    capture = _GradCapture()
    trainer = hf.DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=examples,
                                     processing_class=hf_env.tokenizer, callbacks=[capture])
    trainer.train()
    logged = trainer.state.log_history[0]

    objective = LMObjective.from_config(
        type("M", (), {"spec": trainer.objective.spec, "kd_ratio": 0.4, "loca_alpha": 0.8, "temperature": 2.0,
                       "jsd_beta": 0.5, "skew_lambda": 0.1, "chunk_size": 37})(), vocab_size=trainer.objective.vocab_size)
    assert objective == trainer.objective  # the Trainer trains with the project's objective, same settings
    batch = make_collate_fn(hf_env.tokenizer)(list(examples))
    stats = accumulate_gradients(reference, teacher.eval(), [batch], objective)
    expected = stats.means(0.4, uses_teacher=True)

    # float32 rounding: the summed terms (a few hundred tokens) are added in another order (two micro-batches
    # with their own padding), each step ~eps relative; 64 * eps bounds sqrt(#tokens) * a few eps with margin.
    rtol = 64 * EPS32
    assert logged["loss"] == pytest.approx(expected["loss"], rel=rtol)
    assert logged["ce"] == pytest.approx(expected["ce"], rel=rtol)
    assert logged["kd"] == pytest.approx(expected["kd"], rel=rtol)
    assert 0.0 <= logged["teacher_misinstruction_rate"] <= 1.0
    ref_grads = {n: p.grad for n, p in reference.named_parameters() if p.grad is not None}
    assert capture.grads.keys() == ref_grads.keys()
    scale = max(float(g.abs().max()) for g in ref_grads.values())
    for name, grad in ref_grads.items():
        # each entry is a sum of per-token contributions bounded by the largest gradient; reordering that sum
        # in float32 moves it by at most ~sqrt(#tokens) * eps * scale (300 tokens: ~20 eps) -> 64 eps * scale
        torch.testing.assert_close(capture.grads[name], grad, rtol=0, atol=64 * EPS32 * scale, msg=name)


def test_the_teacher_is_frozen_on_the_students_device_and_never_part_of_the_student(hf_env, tmp_path):
    trainer = hf.DistillationTrainer(model=str(hf_env.pretrained_students["gpt2"]),
                                     teacher_model=str(hf_env.teachers["gpt2"]), args=_args(tmp_path),
                                     train_dataset=_examples(hf_env))
    teacher = trainer.teacher_model
    assert not teacher.module.training
    assert all(not p.requires_grad for p in teacher.parameters())
    teacher.train()  # a parent's .train() cannot switch it back
    assert not teacher.module.training
    device = next(trainer.model.parameters()).device
    assert {p.device for p in teacher.parameters()} == {device}
    student_ids = {id(p) for p in trainer.model.parameters()}
    assert not student_ids & {id(p) for p in teacher.parameters()}
    assert all(not name.startswith("teacher") for name in trainer.model.state_dict())


def test_a_non_finite_loss_is_the_error_lm_distill_raises(hf_env, tmp_path):
    from locakd.errors import NonFiniteLossError

    student = load_causal_lm(hf_env.pretrained_students["gpt2"])
    with torch.no_grad():
        student.get_output_embeddings().weight[0, 0] = float("nan")  # every logit row holds a NaN
    trainer = hf.DistillationTrainer(model=student, teacher_model=str(hf_env.teachers["gpt2"]),
                                     args=_args(tmp_path), train_dataset=_examples(hf_env),
                                     processing_class=hf_env.tokenizer)
    with pytest.raises(NonFiniteLossError, match=r"'ce' became nan at optimizer step 1"):
        trainer.train()


def test_records_in_any_layout_are_tokenised_and_named(hf_env, tmp_path, capsys):
    records = load_instruction_records(hf_env.messages["train"])[:8]
    trainer = hf.DistillationTrainer(model=str(hf_env.pretrained_students["llama"]),
                                     teacher_model=str(hf_env.teachers["llama"]), args=_args(tmp_path),
                                     train_dataset=records, eval_dataset=records[:4])
    assert "train_dataset: messages records, 8/8 examples kept" in capsys.readouterr().err
    assert len(trainer.train_dataset) == 8 and "labels" in trainer.train_dataset[0]
    trainer.train()
    metrics = trainer.evaluate()
    assert metrics["eval_loss"] > 0 and metrics["eval_response_tokens"] > 0


def test_arguments_show_in_hf_argument_parser_and_are_validated(tmp_path):
    parser = transformers.HfArgumentParser(hf.DistillationArguments)
    text = parser.format_help()
    for name in ("--method", "--kd_ratio", "--loca_alpha", "--temperature", "--jsd_beta", "--skew_lambda",
                 "--chunk_size", "--crop_vocab", "--fused_lm_head", "--check_tokenizer"):
        assert name in text
    assert "the label leads the calibrated teacher" in " ".join(text.split())
    (args,) = parser.parse_args_into_dataclasses(["--output_dir", str(tmp_path), "--method", "rkl+loca",
                                                  "--loca_alpha", "0.7", "--chunk_size", "64", "--use_cpu"])
    assert (args.method, args.loca_alpha, args.chunk_size) == ("rkl+loca", 0.7, 64)
    with pytest.raises(ConfigError, match=r"unknown method 'kd\+foo'"):
        hf.DistillationArguments(output_dir=str(tmp_path), method="kd+foo")
    with pytest.raises(ConfigError, match="loca_alpha must be in"):
        hf.DistillationArguments(output_dir=str(tmp_path), loca_alpha=1.0)
    assert hf.DistillationArguments(output_dir=str(tmp_path), fused_lm_head=True).fused_lm_head
    with pytest.raises(ConfigError, match="fused_lm_head=True fuses the divergence .* method 'sft' has no divergence"):
        hf.DistillationArguments(output_dir=str(tmp_path), method="sft", fused_lm_head=True)


def test_a_method_that_needs_a_teacher_refuses_to_run_without_one(hf_env, tmp_path):
    with pytest.raises(ConfigError, match="needs teacher_model"):
        hf.DistillationTrainer(model=str(hf_env.pretrained_students["gpt2"]), args=_args(tmp_path),
                               train_dataset=_examples(hf_env))
    with pytest.raises(ConfigError, match="DistillationArguments"):
        hf.DistillationTrainer(model=str(hf_env.pretrained_students["gpt2"]),
                               args=transformers.TrainingArguments(output_dir=str(tmp_path), use_cpu=True))


def test_tokenizers_of_equal_size_but_different_vocabularies_are_refused(hf_env, tmp_path):
    other = load_tokenizer(hf_env.other_tokenizer_dir)
    assert len(other) == len(hf_env.tokenizer)
    teacher = load_causal_lm(hf_env.teachers["gpt2"])
    with pytest.raises(InputError, match=r"tokenizers differ.*vocabulary: \d+ of \d+ token ids map to different "
                                         r"tokens.*check_tokenizer=False"):
        hf.DistillationTrainer(model=str(hf_env.pretrained_students["gpt2"]), teacher_model=teacher,
                               teacher_tokenizer=other, args=_args(tmp_path), train_dataset=_examples(hf_env))
    # the explicit opt-out trains anyway
    trainer = hf.DistillationTrainer(model=str(hf_env.pretrained_students["gpt2"]), teacher_model=teacher,
                                     teacher_tokenizer=other, args=_args(tmp_path, check_tokenizer=False),
                                     train_dataset=_examples(hf_env))
    assert trainer.teacher_model is not None


def test_a_lora_student_through_peft_config(hf_env, tmp_path):
    peft = pytest.importorskip("peft")
    args = _args(tmp_path, max_steps=2, save_strategy="steps", save_steps=2, learning_rate=1e-2)
    capture = _GradCapture()
    trainer = hf.DistillationTrainer(model=str(hf_env.pretrained_students["llama"]),
                                     teacher_model=str(hf_env.teachers["llama"]), args=args,
                                     train_dataset=_examples(hf_env), callbacks=[capture],
                                     peft_config=peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                                 task_type="CAUSAL_LM"))
    trainer.train()
    assert capture.grads and all("lora_" in name for name in capture.grads)  # only the adapters train
    checkpoint = tmp_path / "out" / "checkpoint-2"
    assert (checkpoint / "adapter_config.json").is_file() and not (checkpoint / "model.safetensors").exists()
    base = load_causal_lm(hf_env.pretrained_students["llama"])
    reloaded = peft.PeftModel.from_pretrained(base, str(checkpoint))
    trained = trainer.model.state_dict()
    for name, value in reloaded.state_dict().items():
        if "lora_" in name:
            assert torch.equal(value, trained[name]), name


def test_the_example_script_distills_one_causal_lm_into_another(hf_env, tmp_path, monkeypatch):
    import runpy
    from pathlib import Path

    script = Path(__file__).resolve().parents[2] / "examples" / "distill_with_trainer.py"
    out = tmp_path / "example"
    monkeypatch.setattr("sys.argv", [
        str(script), "--teacher", str(hf_env.teachers["llama"]), "--student", str(hf_env.pretrained_students["llama"]),
        "--data", str(hf_env.messages["train"]), "--output_dir", str(out), "--max_steps", "2", "--use_cpu",
        "--report_to", "none", "--per_device_train_batch_size", "4", "--max_length", "64", "--max_prompt_length", "48",
        "--save_strategy", "no", "--disable_tqdm", "true"])
    runpy.run_path(str(script), run_name="__main__")
    assert (out / "final" / "model.safetensors").is_file()
    loaded = load_causal_lm(out / "final")
    assert type(loaded).__name__ == "LlamaForCausalLM"
