"""Typed config of one language-model experiment (``locakd lm-sft`` / ``lm-distill`` / ``lm-eval``).

A YAML file with the sections below, loaded strictly by :func:`load_lm_config` (an unknown key, a value
of the wrong type or an unknown method name raises :class:`~locakd.errors.ConfigError` naming it)::

    model:  {student: path/or/hub-name, teacher: ..., tokenizer: ..., teacher_dtype: float32, crop_vocab: false,
             check_tokenizer: true, lora: {r: 0, alpha: 16, dropout: 0.0, target_modules: null}}
    data:   {train: train.jsonl, valid: valid.jsonl, test: test.jsonl, template: alpaca,
             max_length: 512, max_prompt_length: 256}
    method: {name: kd+loca, kd_ratio: 0.5, loca_alpha: 0.9, temperature: 1.0, chunk_size: 1024, fused_lm_head: false}
    optim:  {lr: 5.0e-4, weight_decay: 0.01, warmup_ratio: 0.0, schedule: cosine, grad_clip: 1.0,
             micro_batch_size: 8, grad_accum_steps: 1, epochs: 10}
    run:    {seed: 0, device: auto, precision: float32, out_dir: runs/lm, eval_every: 0, engine: own}  (shared
            keys: locakd.config.RunSection)
    eval:   {max_new_tokens: 128, do_sample: true, seeds: [10, 20, 30, 40, 50], select_by: rouge_l}
    cache:  {dir: teacher_cache/, top_k: 128, num_levels: 128, examples_per_shard: 256, batch_size: 8}
            (lm-cache-teacher; lm-distill reads the cache named by model.teacher_cache)

The defaults follow the MiniLLM KD recipe the LoCa paper builds on (AdamW lr 5e-4, wd 1e-2, cosine,
clip 1.0, max length 512 / prompt 256, kd ratio 0.5, T = 1, checkpoint chosen by validation ROUGE-L,
test generations sampled at temperature 1 / top-p 1 over 5 seeds).

Methods: ``sft`` (cross-entropy only) and a divergence with or without LoCa:
``kd`` (forward KL), ``rkl`` (reverse KL), ``jsd``, ``skew-kl``, ``skew-rkl``, ``tv``; append
``+loca`` to calibrate the teacher's next-token distribution (e.g. ``kd+loca``). The training loss is
``(1 - kd_ratio) * CE + kd_ratio * divergence``, both summed over response tokens and divided by the
number of response tokens of the whole accumulated, all-rank batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ..config import RunSection, apply_overrides, from_dict, option, read_yaml
from ..errors import ConfigError
from ..losses.token import REGISTRY as DIVERGENCE_REGISTRY

# method name -> divergence of locakd.token_distill_loss (None: cross-entropy only); the names
# come from the divergence registry (losses/token.py), each entry knowing its short LM name.
BASE_METHODS: dict[str, str | None] = {"sft": None, **{d.lm_method: d.name for d in DIVERGENCE_REGISTRY.values()}}
METHODS: tuple[str, ...] = ("sft",) + tuple(
    name for base in BASE_METHODS if base != "sft" for name in (base, f"{base}+loca")
)


@dataclass(frozen=True)
class MethodSpec:
    """What a method name means for the loss."""

    name: str
    divergence: str | None  # None: sft
    loca: bool

    @property
    def uses_teacher(self) -> bool:
        return self.divergence is not None


def method_spec(name: str) -> MethodSpec:
    """Parse ``kd``, ``kd+loca``, ``rkl+loca`` ... into a :class:`MethodSpec` (ConfigError if unknown)."""
    base, plus, suffix = name.partition("+")
    if base not in BASE_METHODS or (plus and (suffix != "loca" or base == "sft")):
        raise ConfigError(f"unknown method '{name}'; choose one of {', '.join(METHODS)}")
    return MethodSpec(name=name, divergence=BASE_METHODS[base], loca=bool(plus))


def _help(text: str, default: Any = None, factory: Any = None, *, resume: bool = False,
          identity: str = "experiment") -> Any:
    """A field with its help text and the facts read by :func:`locakd.config.config_keys`."""
    return option(default, text, factory=factory, resume=resume, identity=identity)


@dataclass
class LMLoraConfig:
    r: int = _help("LoRA rank: 0 trains the whole student; > 0 trains LoRA adapters only (peft: pip install "
                   "'locakd[hf]'); best/ and final/ then hold the adapter", 0)
    alpha: float = _help("LoRA alpha (the adapter update is scaled by alpha / r)", 16.0)
    dropout: float = _help("dropout on the LoRA input", 0.0)
    target_modules: list[str] | str | None = _help(
        "modules to adapt, e.g. [q_proj, v_proj] or all-linear; null: peft's default for the architecture", None)


@dataclass
class LMModelConfig:
    student: str = _help("model to train: a save_pretrained folder or a hub name (lm-sft: the teacher to fine-tune)", "")
    teacher: str | None = _help("teacher for lm-distill (folder or hub name); None for sft", None)
    tokenizer: str | None = _help("tokenizer folder or hub name (default: the student's)", None)
    init: Literal["pretrained", "scratch"] = _help(
        "pretrained: load the student's weights; scratch: random init from its config.json (seeded by run.seed)",
        "pretrained",
    )
    teacher_cache: str | None = _help(
        "distill from this cache instead of running model.teacher (a folder written by lm-cache-teacher; "
        "the teacher is then never loaded)", None)
    teacher_dtype: Literal["float32", "bfloat16", "float16"] = _help("dtype the frozen teacher runs in", "float32")
    crop_vocab: bool = _help(
        "if teacher and student output sizes differ (padded embedding rows), compare the shared first V logits",
        False,
    )
    check_tokenizer: bool = _help(
        "refuse a teacher whose tokenizer (read from model.teacher) differs from the student's in vocabulary, "
        "special tokens or encoding; false skips the check", True, resume=True, identity="none")
    lora: LMLoraConfig = field(default_factory=LMLoraConfig)


@dataclass
class LMDataConfig:
    train: str = _help("training records (.jsonl or a Hugging Face dataset name) in one layout per file: Dolly "
                       "instruction/context/response, chat 'messages', or 'prompt'/'completion'", "")
    valid: str | None = _help("validation records (checkpoint selection); None: see valid_holdout", None)
    test: str | None = _help("test records for lm-eval", None, resume=True, identity="none")
    train_split: str = _help("split name when train is a HF dataset", "train")
    valid_split: str = _help("split name when valid is a HF dataset", "validation")
    test_split: str = _help("split name when test is a HF dataset", "test", resume=True, identity="none")
    valid_holdout: int = _help("without data.valid: hold out this many training records as validation", 0)
    template: str = _help("prompt template of Dolly records: alpaca (MiniLLM) or compact (chat records use the "
                          "tokenizer's chat template)", "alpaca")
    prompt_with_context: str | None = _help("custom template ({instruction}, {context}); overrides the preset", None)
    prompt_without_context: str | None = _help("custom template ({instruction}); overrides the preset", None)
    max_length: int = _help("max tokens per example (prompt + response + EOS)", 512)
    max_prompt_length: int = _help("prompt tokens kept (cut from the left)", 256)
    max_train_examples: int | None = _help("use only the first N training records", None)


@dataclass
class LMMethodConfig:
    name: str = _help(f"one of {', '.join(METHODS)}", "kd+loca")
    kd_ratio: float = _help("loss = (1 - kd_ratio) * CE + kd_ratio * divergence (ignored by sft)", 0.5)
    loca_alpha: float = _help("LoCa strength in (0, 1) for the +loca methods", 0.9)
    temperature: float = _help("softmax temperature of teacher and student in the divergence", 1.0)
    jsd_beta: float = _help("mixing weight of jsd in (0, 1)", 0.5)
    skew_lambda: float = _help("skew weight of skew-kl / skew-rkl in (0, 1)", 0.1)
    chunk_size: int | None = _help("token rows per block of the vocabulary-wide losses (None: one shot)", 1024)
    fused_lm_head: bool = _help(
        "compute CE + divergence from both models' final hidden states and output-layer weights, chunk_size "
        "token rows at a time, so neither model's [tokens, vocab] logits are built (memory; not for sft). Equals "
        "the unfused loss to float32 rounding, so it may change on resume; models whose logits are not "
        "hidden @ W.T + b (soft-capping, logit scaling, a LoRA head) are refused", False, resume=True,
        identity="none")

    @property
    def spec(self) -> MethodSpec:
        return method_spec(self.name)


@dataclass
class LMOptimConfig:
    lr: float = _help("AdamW peak learning rate", 5e-4)
    weight_decay: float = _help("AdamW weight decay (not applied to biases and LayerNorm)", 1e-2)
    betas: tuple[float, float] = _help("AdamW betas", None, factory=lambda: (0.9, 0.999))
    eps: float = _help("AdamW epsilon", 1e-8)
    schedule: Literal["cosine", "linear", "constant"] = _help("decay after warm-up", "cosine")
    warmup_steps: int = _help("linear warm-up steps (overrides warmup_ratio when > 0)", 0)
    warmup_ratio: float = _help("warm-up as a fraction of all optimizer steps", 0.0)
    min_lr_ratio: float = _help("final lr as a fraction of lr (cosine / linear)", 0.0)
    grad_clip: float | None = _help("clip the global gradient norm (None/0: off)", 1.0)
    micro_batch_size: int = _help("examples per forward pass per process", 8)
    grad_accum_steps: int = _help("micro-batches per optimizer step", 1)
    epochs: int = _help("passes over the training data (ignored when max_steps is set)", 10, resume=True)
    max_steps: int | None = _help("total optimizer steps (overrides epochs)", None, resume=True)


@dataclass
class LMRunConfig(RunSection):
    """The LM pipeline's run section: the shared keys (:class:`~locakd.config.RunSection`) plus steps."""

    out_dir: str = _help("run directory", "runs/lm", resume=True, identity="none")
    log_every: int = _help("log training metrics every N optimizer steps", 10, resume=True, identity="none")
    eval_every: int = _help("validate every N optimizer steps (0: at the end of every epoch)", 0, resume=True, identity="run")
    save_every: int = _help("write last.pt every N optimizer steps (0: at every validation)", 0, resume=True, identity="none")
    engine: Literal["own", "hf"] = _help(
        "own: locakd's training loop (DDP under torchrun); hf: transformers.Trainer through "
        "locakd.hf.DistillationTrainer (DDP, FSDP or DeepSpeed under accelerate launch). Fixed for the life of "
        "a run: the two engines keep different checkpoints (last.pt vs checkpoint-N/) and data orders", "own")


@dataclass
class LMEvalConfig:
    max_new_tokens: int = _help("tokens generated per prompt", 128)
    do_sample: bool = _help("test decoding: sampling (MiniLLM recipe) or greedy", True, resume=True)
    temperature: float = _help("sampling temperature", 1.0, resume=True)
    top_p: float = _help("nucleus sampling threshold", 1.0, resume=True)
    top_k: int = _help("top-k sampling (0: off)", 0, resume=True)
    seeds: list[int] = _help("generation seeds (greedy decoding uses the first only)", None,
                             factory=lambda: [10, 20, 30, 40, 50], resume=True)
    batch_size: int = _help("prompts per generate() call", 16, resume=True, identity="none")
    case_sensitive: bool = _help("exact match compares case", True)
    select_by: Literal["rouge_l", "exact_match", "loss"] = _help(
        "validation metric that picks run_dir/best (rouge_l / exact_match: greedy generation; loss: CE)", "rouge_l"
    )
    valid_max_examples: int | None = _help("validation records generated for checkpoint selection", 200)
    checkpoint: Literal["best", "final"] = _help("model lm-eval takes from a run directory", "best", resume=True, identity="none")
    misinstruction_max_examples: int | None = _help(
        "training records used for the teacher's token-level mis-instruction rate (None: all)", 2000, resume=True)


@dataclass
class LMCacheConfig:
    """What ``lm-cache-teacher`` writes (a training run reads the cache named by ``model.teacher_cache``)."""

    dir: str | None = _help("folder lm-cache-teacher writes the teacher cache to (train/ and valid/ inside); "
                            "point model.teacher_cache at it to distill from it", None, resume=True, identity="none")
    top_k: int = _help("teacher log-probabilities kept per response token (the k largest; the label's and the "
                       "tail mass are always kept)", 128, resume=True, identity="none")
    num_levels: int = _help("quantisation levels of each stored log-probability: 128 (7 bits) or 256 (8 bits, "
                            "half the quantisation error, 16 more bytes per token at top_k 128)", 128,
                            resume=True, identity="none")
    examples_per_shard: int = _help("examples per shard file: an interrupted capture keeps its finished "
                                    "shards and redoes at most one per process", 256, resume=True, identity="none")
    batch_size: int = _help("examples per teacher forward pass (per process)", 8, resume=True, identity="none")
    valid: bool = _help("also cache the validation examples (data.valid or data.valid_holdout) in valid/",
                        True, resume=True, identity="none")


@dataclass
class LMExperimentConfig:
    model: LMModelConfig = field(default_factory=LMModelConfig)
    data: LMDataConfig = field(default_factory=LMDataConfig)
    method: LMMethodConfig = field(default_factory=LMMethodConfig)
    optim: LMOptimConfig = field(default_factory=LMOptimConfig)
    run: LMRunConfig = field(default_factory=LMRunConfig)
    eval: LMEvalConfig = field(default_factory=LMEvalConfig)
    cache: LMCacheConfig = field(default_factory=LMCacheConfig)

    def validate(self) -> None:
        m, d, o, r, e = self.method, self.data, self.optim, self.run, self.eval
        spec = method_spec(m.name)

        def check(ok: bool, message: str) -> None:
            if not ok:
                raise ConfigError(message)

        check(0.0 <= m.kd_ratio <= 1.0, f"method.kd_ratio must be in [0, 1], got {m.kd_ratio}")
        check(0.0 < m.loca_alpha < 1.0, f"method.loca_alpha must be in (0, 1), got {m.loca_alpha}")
        check(m.temperature > 0 and math.isfinite(m.temperature), f"method.temperature must be > 0, got {m.temperature}")
        check(0.0 < m.jsd_beta < 1.0, f"method.jsd_beta must be in (0, 1), got {m.jsd_beta}")
        check(0.0 < m.skew_lambda < 1.0, f"method.skew_lambda must be in (0, 1), got {m.skew_lambda}")
        check(m.chunk_size is None or m.chunk_size >= 1, f"method.chunk_size must be >= 1 or null, got {m.chunk_size}")
        if spec.uses_teacher and m.kd_ratio == 0.0:
            raise ConfigError(f"method '{m.name}' with method.kd_ratio 0 trains on CE only; use method sft instead")
        check(not (m.fused_lm_head and not spec.uses_teacher),
              f"method.fused_lm_head fuses the divergence to a teacher with the cross-entropy; method '{m.name}' "
              "has no divergence: set method.fused_lm_head=false")
        lora = self.model.lora
        check(lora.r >= 0, f"model.lora.r must be >= 0 (0: no LoRA), got {lora.r}")
        check(lora.alpha > 0, f"model.lora.alpha must be > 0, got {lora.alpha}")
        check(0.0 <= lora.dropout < 1.0, f"model.lora.dropout must be in [0, 1), got {lora.dropout}")
        check(not (lora.r and self.model.init == "scratch"),
              "model.lora trains adapters on a pretrained student; it cannot be combined with model.init: scratch")
        c = self.cache
        check(c.top_k >= 1, f"cache.top_k must be >= 1, got {c.top_k}")
        check(4 <= c.num_levels <= 65536, f"cache.num_levels must be in [4, 65536], got {c.num_levels}")
        check(c.examples_per_shard >= 1, f"cache.examples_per_shard must be >= 1, got {c.examples_per_shard}")
        check(c.batch_size >= 1, f"cache.batch_size must be >= 1, got {c.batch_size}")
        check(d.max_length >= 2, f"data.max_length must be >= 2, got {d.max_length}")
        check(1 <= d.max_prompt_length <= d.max_length,
              f"data.max_prompt_length must be in [1, data.max_length={d.max_length}], got {d.max_prompt_length}")
        check(d.valid_holdout >= 0, f"data.valid_holdout must be >= 0, got {d.valid_holdout}")
        check(d.max_train_examples is None or d.max_train_examples >= 1,
              f"data.max_train_examples must be >= 1 or null, got {d.max_train_examples}")
        self.prompt_template()  # raises on a bad template
        check(o.lr > 0, f"optim.lr must be > 0, got {o.lr}")
        check(o.weight_decay >= 0, f"optim.weight_decay must be >= 0, got {o.weight_decay}")
        check(len(o.betas) == 2 and all(0.0 <= b < 1.0 for b in o.betas), f"optim.betas must be two values in [0, 1), got {o.betas}")
        check(o.warmup_steps >= 0, f"optim.warmup_steps must be >= 0, got {o.warmup_steps}")
        check(0.0 <= o.warmup_ratio < 1.0, f"optim.warmup_ratio must be in [0, 1), got {o.warmup_ratio}")
        check(0.0 <= o.min_lr_ratio <= 1.0, f"optim.min_lr_ratio must be in [0, 1], got {o.min_lr_ratio}")
        check(o.grad_clip is None or o.grad_clip >= 0, f"optim.grad_clip must be >= 0 or null, got {o.grad_clip}")
        check(o.micro_batch_size >= 1, f"optim.micro_batch_size must be >= 1, got {o.micro_batch_size}")
        check(o.grad_accum_steps >= 1, f"optim.grad_accum_steps must be >= 1, got {o.grad_accum_steps}")
        check(o.epochs >= 1, f"optim.epochs must be >= 1, got {o.epochs}")
        check(o.max_steps is None or o.max_steps >= 1, f"optim.max_steps must be >= 1 or null, got {o.max_steps}")
        check(r.log_every >= 1, f"run.log_every must be >= 1, got {r.log_every}")
        check(r.eval_every >= 0, f"run.eval_every must be >= 0, got {r.eval_every}")
        check(r.save_every >= 0, f"run.save_every must be >= 0, got {r.save_every}")
        check(e.max_new_tokens >= 1, f"eval.max_new_tokens must be >= 1, got {e.max_new_tokens}")
        check(e.temperature > 0, f"eval.temperature must be > 0, got {e.temperature}")
        check(0.0 < e.top_p <= 1.0, f"eval.top_p must be in (0, 1], got {e.top_p}")
        check(e.top_k >= 0, f"eval.top_k must be >= 0, got {e.top_k}")
        check(len(e.seeds) >= 1, "eval.seeds must hold at least one seed")
        check(e.batch_size >= 1, f"eval.batch_size must be >= 1, got {e.batch_size}")
        check(e.valid_max_examples is None or e.valid_max_examples >= 1,
              f"eval.valid_max_examples must be >= 1 or null, got {e.valid_max_examples}")
        check(e.misinstruction_max_examples is None or e.misinstruction_max_examples >= 1,
              f"eval.misinstruction_max_examples must be >= 1 or null, got {e.misinstruction_max_examples}")

    def prompt_template(self):
        """The :class:`~locakd.lm.data.PromptTemplate` of ``data`` (preset, with custom strings on top)."""
        from .data import PromptTemplate

        base = PromptTemplate.from_config(self.data.template)
        if self.data.prompt_with_context is None and self.data.prompt_without_context is None:
            return base
        return PromptTemplate(
            with_context=self.data.prompt_with_context or base.with_context,
            without_context=self.data.prompt_without_context or base.without_context,
        )

    @property
    def decode_seeds(self) -> list[int]:
        """Seeds actually used for test generation: greedy decoding is deterministic, so one seed."""
        return list(self.eval.seeds) if self.eval.do_sample else list(self.eval.seeds[:1])


def load_lm_config(
    path: str | Path | None = None,
    overrides: list[str] | None = None,
    *,
    default_method: str | None = None,
    require_method: str | None = None,
) -> LMExperimentConfig:
    """Load an :class:`LMExperimentConfig` from YAML plus ``key=value`` overrides.

    ``default_method`` fills ``method.name`` when neither the file nor the overrides set it;
    ``require_method`` (``lm-sft``: ``"sft"``) rejects any other method with a clear error instead of
    silently training something else.
    """
    data = read_yaml(path) if path is not None else {}
    apply_overrides(data, list(overrides or []))
    method = data.get("method")
    if default_method is not None and (not isinstance(method, dict) or "name" not in method):
        data.setdefault("method", {})
        if isinstance(data["method"], dict):
            data["method"]["name"] = default_method
    config = from_dict(LMExperimentConfig, data)
    if require_method is not None and config.method.name != require_method:
        raise ConfigError(
            f"this command trains with method '{require_method}' but the config sets method.name "
            f"'{config.method.name}'; remove it or use lm-distill"
        )
    return config
