"""``lm-distill`` from a teacher cache (``model.teacher_cache``): the loss of a step against the sparse loss on
the decoded rows and against the dense teacher, whole runs in both engines without the teacher, the
mis-instruction rate against the online teacher's, mismatched caches, and resume."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from locakd.config import from_dict
from locakd.errors import CheckpointError, ConfigError
from locakd.lm.batch_loss import CachedTeacher, DenseLogits, micro_batch_loss
from locakd.lm.build import load_run_tokenizer, load_train_valid_records, teacher_misinstruction, tokenize
from locakd.lm.cache import IndexedExamples, TeacherCache, open_teacher_cache
from locakd.lm.cache_command import capture_teacher_cache
from locakd.lm.config import LMExperimentConfig
from locakd.lm.data import EXAMPLE_INDEX, make_collate_fn
from locakd.lm.models import create_causal_lm, load_causal_lm, tiny_gpt2_config
from locakd.lm.trainer import train_lm
from locakd.losses.objectives import LMObjective
from locakd.losses.sparse import sparse_token_distill_loss

EPS32 = torch.finfo(torch.float32).eps
# Two float32 forwards of the same example in other batches (other padding) agree to ~3e-5 in the logits
# and as much again in the log-softmax (|z| <~ 30, ~sqrt(64) roundings of eps each): 1e-4 nats (as in
# test_cache_command).
FWD_TOL = 1e-4

TRAIN = {"optim": {"lr": 3e-3, "micro_batch_size": 4, "grad_accum_steps": 2, "max_steps": 3, "warmup_steps": 1},
         "run": {"tensorboard": False, "log_every": 1, "eval_every": 2},
         "eval": {"select_by": "loss", "misinstruction_max_examples": 20}}


def _config(cache_run, *, out_dir=None, cache=None, **sections) -> LMExperimentConfig:
    merged = {name: dict(values) for name, values in TRAIN.items()}
    for name, values in sections.items():
        merged[name] = {**merged.get(name, {}), **values}
    merged["run"] = {**merged["run"], "out_dir": str(out_dir or "unused")}
    if cache is not None:
        merged["model"] = {"teacher_cache": str(cache), **merged.get("model", {})}
    return from_dict(LMExperimentConfig, cache_run.config(None, **merged))


def _capture(cache_run, root: Path, **cache) -> Path:
    directory = root / "cache"
    capture_teacher_cache(from_dict(LMExperimentConfig, cache_run.config(directory, cache=cache)))
    return directory


@pytest.fixture(scope="module")
def cache_dir(cache_run, tmp_path_factory) -> Path:
    """A cache at top_k 16 (most of the mass, not all of it: the tail matters)."""
    return _capture(cache_run, tmp_path_factory.mktemp("cache16"))


@pytest.fixture(scope="module")
def full_cache_dir(cache_run, tmp_path_factory) -> Path:
    """A cache whose top_k is the whole vocabulary: nothing is in the tail."""
    return _capture(cache_run, tmp_path_factory.mktemp("cache_full"), top_k=len(cache_run.tokenizer))


def _train_examples(config):
    tokenizer = load_run_tokenizer(config)
    return tokenizer, tokenize(config, load_train_valid_records(config).train, tokenizer)


def _student(cache_run) -> torch.nn.Module:
    config = tiny_gpt2_config(len(cache_run.tokenizer), n_layer=1, n_head=2, n_embd=16, n_positions=64)
    return create_causal_lm(config, seed=5)


def _nearest_level_error(gaps: np.ndarray, levels: np.ndarray) -> np.ndarray:
    """How far the codec moves a gap ``log p_top - log p`` (>= 0): to the nearest of its finite levels
    (code 0 only for an exact 0; beyond the last level, to the last one), the rounding it documents."""
    finite = levels[1:-1]
    error = np.abs(gaps[..., None] - finite).min(axis=-1)
    return np.where(gaps == 0, 0.0, error)


# --------------------------------------------------------------------------------------------------
# One step
# --------------------------------------------------------------------------------------------------


def test_a_cached_step_equals_the_sparse_loss_on_the_decoded_rows_and_the_dense_loss_within_the_codec_bound(
        cache_run, full_cache_dir):
    config = _config(cache_run, cache=full_cache_dir, method={"name": "kd+loca", "chunk_size": 29})
    tokenizer, examples = _train_examples(config)
    cache = open_teacher_cache(config, tokenizer, examples=examples, student_vocab_size=len(tokenizer))
    assert cache.top_k == cache.vocab_size == len(tokenizer)
    student = _student(cache_run)

    def no_index(module, args, kwargs):  # the cache's row key never reaches the model
        assert EXAMPLE_INDEX not in kwargs

    student.register_forward_pre_hook(no_index, with_kwargs=True)
    indices = [5, 0, 3, 17, 9]
    batch = make_collate_fn(tokenizer)([IndexedExamples(examples)[i] for i in indices])
    assert batch[EXAMPLE_INDEX].tolist() == indices
    labels = batch["labels"]
    n = float((labels[:, 1:] != -100).sum())

    for method in ("kd+loca", "rkl"):
        objective = LMObjective.from_config(_config(cache_run, method={"name": method, "chunk_size": 29}).method)
        loss_of = micro_batch_loss(objective, None, teacher_cache=cache)
        assert isinstance(loss_of, CachedTeacher)
        student.zero_grad()
        terms, output = loss_of(student, batch, n, count_misinstructed=True)
        terms.loss.backward()
        grad = {k: p.grad.clone() for k, p in student.named_parameters()}

        # the same loss from the decoded rows, flattened another way (cache.read with the labels)
        student.zero_grad()
        logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        shifted = labels[:, 1:]
        valid = shifted != -100
        rows = cache.read(indices, labels=shifted[valid])
        flat = logits[:, :-1][valid]
        kd = sparse_token_distill_loss(flat, rows.topk_ids, rows.topk_logprobs, shifted[valid], rows.label_logprob,
                                       objective.spec.divergence, tail_logprob=rows.tail_logprob,
                                       loca_alpha=0.9 if objective.spec.loca else None, chunk_size=29,
                                       reduction="sum")
        ce = torch.nn.functional.cross_entropy(flat, shifted[valid], reduction="sum")
        # the same rows in the same order and blocks: the sums agree to the last bit
        assert float(terms.kd_sum) == float(kd.detach())
        # the CE is summed in other groupings (blocks of 29 rows): a few ulps x |CE| x sqrt(terms)
        assert float(terms.ce_sum) == pytest.approx(float(ce.detach()), rel=4 * EPS32 * math.sqrt(n))
        (((1 - objective.kd_ratio) * ce + objective.kd_ratio * kd) / n).backward()
        for name, p in student.named_parameters():
            torch.testing.assert_close(grad[name], p.grad, rtol=4 * EPS32 * math.sqrt(n), atol=1e-9, msg=name)
        mis = (rows.label_logprob < rows.topk_logprobs[:, 0]).sum()
        assert float(terms.n_misinstructed) == float(mis)

    # against the dense teacher (forward KL, no LoCa): the codec moves each gap log p_top - log p_i by at most
    # h_i (its nearest level) plus the forward noise, so each log p_i by at most e_i = h_i + log sum_j p_j e^h_j
    # (the normaliser's shift), and per token |KL(p^||q) - KL(p||q)| <= sum_i p_i [e^e_i e_i + (e^e_i - 1)
    # |log p_i - log q_i|]  (KL(p^||q) - KL(p||q) = KL(p^||p) + sum (p^_i - p_i) log(p_i / q_i)).
    objective = LMObjective.from_config(_config(cache_run, method={"name": "kd"}).method)
    teacher = load_causal_lm(cache_run.teacher, dtype="float32").eval()
    with torch.no_grad():
        cached, _ = CachedTeacher(objective, cache)(student, batch, n)
        teacher_logits = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        dense, _ = DenseLogits(objective, teacher)(student, batch, n)
        s_logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert float(cached.ce_sum) == float(dense.ce_sum)  # the same student CE
    valid = labels[:, 1:] != -100
    log_p = torch.log_softmax(teacher_logits[:, :-1][valid].double(), dim=-1).numpy()
    log_q = torch.log_softmax(s_logits[:, :-1][valid].double(), dim=-1).numpy()
    p = np.exp(log_p)
    h = _nearest_level_error(log_p.max(axis=1, keepdims=True) - log_p, cache.codec.levels) + 2 * FWD_TOL
    shift = np.log((p * np.exp(h)).sum(axis=1, keepdims=True))
    e = h + shift
    bound = (p * (np.exp(e) * e + np.expm1(e) * np.abs(log_p - log_q))).sum()
    # float32 rounding of both sums: a few ulps x (|KL| + |sum p log q| per token) x sqrt(V terms), over the tokens
    rounding = 8 * EPS32 * math.sqrt(log_p.shape[1]) * float((p * (np.abs(log_p) + np.abs(log_q))).sum())
    assert abs(float(cached.kd_sum) - float(dense.kd_sum)) <= bound + rounding
    assert bound < 0.05 * float(dense.kd_sum)  # the bound says something: the cache is close to the teacher


def test_fused_lm_head_and_both_teachers_are_refused(cache_run, cache_dir):
    config = _config(cache_run, cache=cache_dir)
    tokenizer, examples = _train_examples(config)
    cache = open_teacher_cache(config, tokenizer, examples=examples)
    objective = LMObjective.from_config(config.method)
    with pytest.raises(ConfigError, match="fused_lm_head"):
        micro_batch_loss(objective, None, fused_lm_head=True, teacher_cache=cache)
    with pytest.raises(ConfigError, match="not both"):
        micro_batch_loss(objective, torch.nn.Linear(2, 2), teacher_cache=cache)
    with pytest.raises(ConfigError, match="fused_lm_head"):
        train_lm(_config(cache_run, cache=cache_dir, method={"fused_lm_head": True}))
    with pytest.raises(ConfigError, match="teacher_cache"):
        train_lm(_config(cache_run, cache=cache_dir, method={"name": "sft"}, model={"teacher": None}), command="lm-sft")
    # a batch without example indices
    batch = make_collate_fn(tokenizer)([examples[0], examples[1]])
    with pytest.raises(ConfigError, match=EXAMPLE_INDEX):
        CachedTeacher(objective, cache)(_student(cache_run), batch, 1.0)


# --------------------------------------------------------------------------------------------------
# Whole runs
# --------------------------------------------------------------------------------------------------


def _online_misinstruction(cache_run, config) -> tuple[dict, int]:
    """The online teacher's rate as lm-distill measures it, and the tokens whose label ties the top within
    the forward noise (where another batching may decide the other way)."""
    tokenizer, examples = _train_examples(config)
    teacher = load_causal_lm(cache_run.teacher, dtype="float32").eval()
    online = teacher_misinstruction(config, teacher, tokenizer, examples, vocab_size=len(tokenizer))
    near_ties = 0
    collate = make_collate_fn(tokenizer)
    for i in range(online["n_examples"]):
        batch = collate([examples[i]])
        with torch.no_grad():
            logits = teacher(input_ids=batch["input_ids"]).logits[:, :-1].double()
        valid = batch["labels"][:, 1:] != -100
        lp = torch.log_softmax(logits[valid], dim=-1)
        label = lp.gather(1, batch["labels"][:, 1:][valid].unsqueeze(1)).squeeze(1)
        near_ties += int(((lp.max(dim=1).values - label).abs() <= FWD_TOL).sum())
    return online, near_ties


@pytest.mark.parametrize("engine", ["own", "hf"])
def test_lm_distill_from_the_cache_without_the_teacher(cache_run, cache_dir, tmp_path, capsys, engine):
    from locakd.cli.main import main

    out = tmp_path / "run"
    config = _config(cache_run, out_dir=out, cache=cache_dir, model={"teacher": str(tmp_path / "no-such-teacher")},
                     run={"engine": engine})
    import yaml

    from locakd.config import to_dict

    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(to_dict(config), sort_keys=False))
    assert main(["lm-distill", str(path)]) == 0, capsys.readouterr().err[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["step"] == 3 and summary["teacher_params"] is None
    assert summary["vocab_size"] == len(cache_run.tokenizer)
    assert summary["last_valid"]["loss"] > 0 and math.isfinite(summary["last_train"]["kd"])
    assert (out / "final" / "model.safetensors").is_file()
    mis = summary["teacher_misinstruction"]
    if engine == "own":
        # the rate on the first eval.misinstruction_max_examples training examples, as the online run measures it
        online, near_ties = _online_misinstruction(cache_run, config)
        assert mis["n_examples"] == online["n_examples"] == 20 and mis["n_tokens"] == online["n_tokens"]
        assert abs(mis["n_misinstructed"] - online["n_misinstructed"]) <= near_ties
        assert summary["teacher_cache"]["dir"] == str(cache_dir)
    else:
        # the hf engine measures it on the response tokens it trained on (as online)
        assert mis["measured_on"] == "trained response tokens"
        assert mis["n_tokens"] == summary["tokens_trained"] > 0 and 0 <= mis["n_misinstructed"] <= mis["n_tokens"]


def test_the_rate_over_the_whole_cache_equals_the_count_at_capture(cache_run, cache_dir):
    from locakd.lm.cache import cached_misinstruction

    config = _config(cache_run, cache=cache_dir)
    _, examples = _train_examples(config)
    cache = TeacherCache(cache_dir / "train")
    whole = cached_misinstruction(cache, examples)
    assert whole["n_tokens"] == cache.num_tokens
    assert whole["n_misinstructed"] == cache.misinstruction()["n_misinstructed"]  # decoded == unquantised count


def test_a_mismatched_cache_is_refused_before_training(cache_run, cache_dir, tmp_path):
    for sections, field in [({"data": {"max_length": 40}}, "max_length"),
                            ({"method": {"temperature": 2.0}}, "temperature"),
                            ({"data": {"max_train_examples": 12}}, "data_selection")]:
        out = tmp_path / field
        with pytest.raises(ConfigError, match=f"{field} is"):
            train_lm(_config(cache_run, out_dir=out, cache=cache_dir, **sections))
        assert not (out / "last.pt").exists() and not (out / "final").exists()


def test_resume_from_the_cache_gives_the_same_weights_and_guards_the_cache(cache_run, cache_dir, tmp_path):
    from safetensors.torch import load_file

    straight = _config(cache_run, out_dir=tmp_path / "straight", cache=cache_dir, run={"save_every": 1})
    train_lm(straight)
    split = _config(cache_run, out_dir=tmp_path / "split", cache=cache_dir, run={"save_every": 1})
    assert train_lm(split, stop_after_steps=2)["status"] == "stopped"
    # another cache folder: the run's key may not change on resume
    other = _config(cache_run, out_dir=tmp_path / "split", cache=tmp_path / "elsewhere", run={"save_every": 1})
    with pytest.raises(ConfigError, match="model.teacher_cache"):
        train_lm(other, resume=True)
    assert train_lm(split, resume=True)["status"] == "finished"
    a = load_file(str(tmp_path / "straight" / "final" / "model.safetensors"))
    b = load_file(str(tmp_path / "split" / "final" / "model.safetensors"))
    for name in a:
        assert torch.equal(a[name], b[name]), name
    s1 = json.loads((tmp_path / "straight" / "summary.json").read_text())
    s2 = json.loads((tmp_path / "split" / "summary.json").read_text())
    assert s1["teacher_misinstruction"] == s2["teacher_misinstruction"]
    assert s1["last_train"]["loss"] == s2["last_train"]["loss"]


def test_resume_refuses_a_cache_whose_rows_changed(cache_run, cache_dir, tmp_path):
    import shutil

    copy = tmp_path / "cache"
    shutil.copytree(cache_dir, copy)
    config = _config(cache_run, out_dir=tmp_path / "run", cache=copy)
    train_lm(config, stop_after_steps=1)
    # the same folder re-captured at another top_k (the run's identity fields are unchanged)
    shutil.rmtree(copy)
    capture_teacher_cache(from_dict(LMExperimentConfig, cache_run.config(copy, cache={"top_k": 8})))
    with pytest.raises(CheckpointError, match="another teacher cache"):
        train_lm(config, resume=True)
