"""Distill a Hugging Face causal LM into a smaller one with KD + LoCa inside ``transformers.Trainer``.

    python examples/distill_with_trainer.py --teacher Qwen/Qwen2.5-1.5B-Instruct \
        --student Qwen/Qwen2.5-0.5B-Instruct --data trl-lib/Capybara --output_dir runs/qwen-kd-loca --bf16
    accelerate launch --config_file fsdp.yaml examples/distill_with_trainer.py ...   # DDP / FSDP / DeepSpeed

Every ``TrainingArguments`` option works (``--learning_rate``, ``--report_to wandb`` ...), plus the
distillation ones (``--method rkl+loca``, ``--kd_ratio``, ``--loca_alpha``, ``--temperature`` ...): see --help.
"""

from dataclasses import dataclass, field

from transformers import HfArgumentParser

from locakd.hf import DistillationArguments, DistillationTrainer
from locakd.lm.data import load_instruction_records


@dataclass
class Sources:
    teacher: str = field(metadata={"help": "teacher: a save_pretrained folder or a hub name"})
    student: str = field(metadata={"help": "student: a folder or hub name sharing the teacher's tokenizer"})
    data: str = field(metadata={"help": ".jsonl file or hub dataset: 'messages', 'prompt'/'completion' or Dolly"})


sources, args = HfArgumentParser((Sources, DistillationArguments)).parse_args_into_dataclasses()
trainer = DistillationTrainer(model=sources.student, teacher_model=sources.teacher, args=args,
                              train_dataset=load_instruction_records(sources.data))
trainer.train()
trainer.save_model(f"{args.output_dir}/final")  # the student (or its LoRA adapter) only, never the teacher
