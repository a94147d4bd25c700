"""Language-model commands: ``lm-sft``, ``lm-distill``, ``lm-eval``, ``lm-cache-teacher``.

    locakd lm-sft configs/lm/dolly_teacher_sft.yaml
    locakd lm-distill configs/lm/dolly/gpt2-base_kd+loca.yaml run.seed=1
    locakd lm-distill configs/lm/dolly/gpt2-base_kd+loca.yaml --resume
    torchrun --nproc_per_node 4 -m locakd.cli.main lm-distill CONFIG optim.micro_batch_size=4
    locakd lm-eval runs/lm/kd+loca            # a run directory (its best/ model) or a config file
    locakd lm-cache-teacher configs/lm/dolly/gpt2-base_kd+loca.yaml cache.dir=cache/dolly-xl cache.top_k=64
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

EPILOG = """\
Overrides are KEY=VALUE pairs after CONFIG (values are YAML: eval.seeds=[1,2,3]), e.g.
run.seed=1 optim.lr=1e-4 run.device=cpu. Options go before CONFIG or after all overrides.
Unknown keys and unknown method names are errors.

optim.micro_batch_size is PER PROCESS: under `torchrun --nproc_per_node N -m locakd.cli.main ...`
one optimizer step sees N x micro_batch_size x grad_accum_steps examples; the CE and KD losses are
divided by the response tokens of that whole batch. Only rank 0 writes files.

Outputs in run.out_dir: config.yaml, metrics.jsonl, tensorboard/, last.pt (resume state),
best/ (highest validation ROUGE-L) and final/ (both save_pretrained model + tokenizer, loadable
with AutoModelForCausalLM.from_pretrained), summary.json.

Config keys (KEY = default  # meaning):
"""


CACHE_EPILOG = """\
Overrides are KEY=VALUE pairs after CONFIG (values are YAML). The keys that matter here: model.teacher,
model.teacher_dtype, model.tokenizer / model.student (the tokenizer), model.crop_vocab, data.*,
method.temperature, run.device, run.progress and the cache section. A cache is tied to the run's
tokenizer, data files, template, lengths and temperature: lm-distill with model.teacher_cache refuses a
cache that differs in any of them and names the field.

Sizes: about 2 + log2(V / k) bits per stored id and 7 bits per value (8 with cache.num_levels=256);
at top_k 128 about 283 / 310 / 320 bytes per token for vocabularies of 50k / 152k / 262k.

Config keys (KEY = default  # meaning):
"""


def _key_reference() -> str:
    from ..config import describe
    from ..lm.config import LMExperimentConfig

    return "\n".join(describe(LMExperimentConfig))


def register(subparsers) -> None:
    epilog = EPILOG + _key_reference()
    commands = {
        "lm-sft": (
            "fine-tune a causal LM on instruction data (method sft), e.g. a teacher",
            "Fine-tune model.student with cross-entropy on the response tokens of data.train "
            "(method.name sft; model.teacher must be unset). Typically used to train the teacher.",
        ),
        "lm-distill": (
            "distill a frozen teacher LM into a student (kd, kd+loca, rkl, rkl+loca, jsd, tv, ...)",
            "Train model.student with (1 - kd_ratio) * CE + kd_ratio * divergence to the frozen "
            "model.teacher over response tokens. method.name: sft | kd | kd+loca | rkl | rkl+loca | "
            "jsd | jsd+loca | skew-kl | skew-kl+loca | skew-rkl | skew-rkl+loca | tv | tv+loca. "
            "Reports the teacher's token-level mis-instruction rate on the training responses first. "
            "With model.teacher_cache=DIR (written by lm-cache-teacher) the teacher is never loaded: its "
            "top-k log-probabilities, the label's and the tail mass are read from the cache (tail as one "
            "bucket, LoCa exact), which must match the run's tokenizer, data, template, lengths and "
            "temperature.",
        ),
    }
    for name, (help_text, description) in commands.items():
        parser = subparsers.add_parser(name, help=help_text, description=description, epilog=epilog,
                                       formatter_class=argparse.RawDescriptionHelpFormatter)
        parser.add_argument("config", metavar="CONFIG",
                            help="YAML experiment file (with --resume also a run directory)")
        parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides")
        parser.add_argument("--resume", action="store_true",
                            help="continue the run in run.out_dir from its last.pt")
        parser.add_argument("--stop-after-steps", type=int, default=None, metavar="N",
                            help="stop (with a checkpoint) after N optimizer steps of this session; "
                                 "continue later with --resume")
        parser.add_argument("--print-config", action="store_true",
                            help="print the resolved config as YAML and exit")
        parser.set_defaults(func=run_train, command_name=name)

    parser = subparsers.add_parser(
        "lm-eval",
        help="generate for the test set and score ROUGE-L / exact match",
        description=(
            "Generate a response for every data.test record (greedy, or sampling over eval.seeds) and "
            "report ROUGE-L and exact match as mean +- std over seeds; writes generations.jsonl and "
            "eval.json. With a run directory the model is its best/ (eval.checkpoint) and the config its "
            "config.yaml; with a config file the model is model.student. When model.teacher is set, the "
            "teacher's token-level mis-instruction rate on the training responses is reported too."
        ),
        epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("source", metavar="CONFIG_OR_RUN_DIR", help="a run directory or a YAML config")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="config overrides (e.g. eval.do_sample=false data.test=other.jsonl)")
    parser.add_argument("--out", default=None, metavar="DIR",
                        help="output folder (default: RUN_DIR/eval or run.out_dir/eval)")
    parser.add_argument("--checkpoint", choices=["best", "final"], default=None,
                        help="which model of a run directory (default: eval.checkpoint)")
    parser.set_defaults(func=run_eval)

    parser = subparsers.add_parser(
        "lm-cache-teacher",
        help="run the teacher once and cache its top-k next-token log-probabilities (offline teacher)",
        description=(
            "Run model.teacher (in model.teacher_dtype) once over the training and validation examples, "
            "tokenised exactly as lm-distill tokenises them (same records, template, lengths, tokenizer; the "
            "teacher's tokenizer is checked against it), and write per response token the cache.top_k largest "
            "log-probabilities at method.temperature, the label token's log-probability and the tail mass to "
            "cache.dir (train/ and valid/: sharded safetensors + manifest.json with the run's identity). "
            "Interrupted? Run the same command again: finished shards are kept; a finished cache is reported, "
            "not redone. Under `torchrun --nproc_per_node N -m locakd.cli.main lm-cache-teacher ...` the "
            "processes write disjoint shards. Reports bytes per token, the teacher's token-level "
            "mis-instruction rate and the capture throughput (also in cache.dir/capture.json). Train from it "
            "with `locakd lm-distill CONFIG model.teacher_cache=DIR`."
        ),
        epilog=CACHE_EPILOG + _key_reference(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("config", metavar="CONFIG", help="YAML experiment file (the lm-distill config of the run)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="config overrides, e.g. cache.dir=cache/ cache.top_k=64 cache.batch_size=4")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config as YAML and exit")
    parser.set_defaults(func=run_cache_teacher)


def _is_main_process() -> bool:
    return os.environ.get("RANK", "0") == "0"


def run_train(args: argparse.Namespace) -> int:
    import yaml

    from ..config import to_dict
    from ..lm.config import load_lm_config
    from ..lm.trainer import check_command, train_lm

    config_path = Path(args.config)
    if config_path.is_dir():
        if not args.resume:
            from ..errors import ConfigError

            raise ConfigError(f"{config_path} is a directory; pass a YAML config (or a run directory with --resume)")
        config_path = config_path / "config.yaml"
    sft = args.command_name == "lm-sft"
    config = load_lm_config(config_path, args.overrides, default_method="sft" if sft else None,
                            require_method="sft" if sft else None)
    if args.print_config:
        check_command(config, args.command_name)
        print(yaml.safe_dump(to_dict(config), sort_keys=False), end="")
        return 0
    summary = train_lm(config, command=args.command_name, resume=args.resume,
                       stop_after_steps=args.stop_after_steps)
    if _is_main_process():
        keys = ("method", "status", "step", "best", "final_model", "teacher_misinstruction", "wall_time_s")
        print(json.dumps({k: summary.get(k) for k in keys} | {"run_dir": config.run.out_dir}))
    return 0


def run_eval(args: argparse.Namespace) -> int:
    from ..lm.eval_command import run_lm_eval

    result = run_lm_eval(args.source, args.overrides, out_dir=args.out, checkpoint=args.checkpoint)
    keys = ("model", "n_examples", "rouge_l_mean", "rouge_l_std", "exact_match_mean", "exact_match_std",
            "teacher_misinstruction")
    print(json.dumps({k: result.get(k) for k in keys}))
    return 0


def run_cache_teacher(args: argparse.Namespace) -> int:
    import yaml

    from ..config import to_dict
    from ..lm.cache_command import capture_teacher_cache
    from ..lm.config import load_lm_config

    config = load_lm_config(args.config, args.overrides)
    if args.print_config:
        print(yaml.safe_dump(to_dict(config), sort_keys=False), end="")
        return 0
    report = capture_teacher_cache(config)
    if _is_main_process():
        keys = ("status", "cache_dir", "captured_tokens", "tokens_per_s")
        splits = {s: {k: v.get(k) for k in ("num_tokens", "bytes_per_token")} | {
            "misinstruction_rate": v["teacher_misinstruction"]["misinstruction_rate"]}
            for s, v in report.get("splits", {}).items()}
        print(json.dumps({k: report.get(k) for k in keys} | {"splits": splits}))
    return 0
