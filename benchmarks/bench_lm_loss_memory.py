"""Peak extra memory of the token-level distillation loss: chunked vs straightforward.

Each variant runs in a fresh subprocess. The logits (student, teacher) and labels
are allocated first and the process's peak resident memory is read; then one
forward + backward of ``token_distill_loss`` runs and the peak is read again. The
difference is the loss's peak extra memory (the student's gradient, which any
implementation must produce, is included in both). Loss values and gradients of
the two variants are compared.

    python benchmarks/bench_lm_loss_memory.py                      # V=50257, 8192 tokens
    python benchmarks/bench_lm_loss_memory.py --tokens 2048 --json out.json

Target (issue 5): chunked peak extra <= 1/4 of straightforward, values equal to 1e-5.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux reports KiB


def worker(args: argparse.Namespace) -> None:
    import torch

    from locakd import token_distill_loss

    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    tokens, vocab = args.tokens, args.vocab
    student = torch.randn(tokens, vocab, generator=generator).mul_(2.0).requires_grad_(True)
    teacher = torch.randn(tokens, vocab, generator=generator).mul_(2.0)
    labels = torch.randint(0, vocab, (tokens,), generator=generator)
    labels[: tokens // 8] = -100  # prompt positions
    student.grad = torch.zeros_like(student)  # the gradient buffer exists in every variant
    baseline = _peak_rss_mib()
    start = time.perf_counter()
    loss = token_distill_loss(
        student,
        teacher,
        labels,
        args.divergence,
        loca_alpha=args.loca_alpha,
        chunk_size=args.chunk_size if args.variant == "chunked" else None,
    )
    loss.backward()
    elapsed = time.perf_counter() - start
    peak = _peak_rss_mib()
    grad = student.grad
    sample = grad[tokens // 8 :: max(1, tokens // 64), :: max(1, vocab // 16)]
    print(
        json.dumps(
            {
                "variant": args.variant,
                "loss": float(loss),
                "grad_sum": float(grad.double().sum()),
                "grad_abs_sum": float(grad.double().abs().sum()),
                "grad_sample": sample.flatten().tolist(),
                "baseline_rss_mib": baseline,
                "peak_rss_mib": peak,
                "extra_mib": peak - baseline,
                "seconds": elapsed,
                "threads": torch.get_num_threads(),
            }
        )
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=8192, help="token rows in the batch")
    parser.add_argument("--vocab", type=int, default=50257, help="vocabulary size V (GPT-2: 50257)")
    parser.add_argument("--divergence", default="forward_kl", help="token divergence to measure")
    parser.add_argument("--loca-alpha", type=float, default=0.9, help="LoCa alpha (use 0 to disable)")
    parser.add_argument("--chunk-size", type=int, default=512, help="token rows per block in the chunked path")
    parser.add_argument("--json", help="also write the results to this JSON file")
    parser.add_argument("--variant", choices=["chunked", "straightforward"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.loca_alpha == 0:
        args.loca_alpha = None
    if args.variant:
        worker(args)
        return 0

    results = {}
    for variant in ("straightforward", "chunked"):
        cmd = [sys.executable, __file__, "--variant", variant, "--tokens", str(args.tokens),
               "--vocab", str(args.vocab), "--divergence", args.divergence,
               "--loca-alpha", str(args.loca_alpha or 0), "--chunk-size", str(args.chunk_size)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        results[variant] = json.loads(out.strip().splitlines()[-1])

    plain, chunked = results["straightforward"], results["chunked"]
    ratio = chunked["extra_mib"] / plain["extra_mib"]
    loss_diff = abs(plain["loss"] - chunked["loss"])
    grad_diff = max(abs(a - b) for a, b in zip(plain["grad_sample"], chunked["grad_sample"], strict=True))
    one_copy = args.tokens * args.vocab * 4 / 2**20
    print(f"tokens={args.tokens} V={args.vocab} divergence={args.divergence} loca_alpha={args.loca_alpha} "
          f"chunk_size={args.chunk_size}; one float32 [tokens, V] copy = {one_copy:.0f} MiB")
    print(f"{'variant':16} {'peak extra MiB':>15} {'copies':>7} {'seconds':>8} {'loss':>14}")
    for name, res in results.items():
        print(f"{name:16} {res['extra_mib']:15.0f} {res['extra_mib'] / one_copy:7.2f} "
              f"{res['seconds']:8.2f} {res['loss']:14.8f}")
    values_ok = loss_diff <= 1e-5 * max(1.0, abs(plain["loss"])) and grad_diff <= 1e-5
    print(f"memory ratio chunked/straightforward = {ratio:.3f} (target <= 0.25): {'PASS' if ratio <= 0.25 else 'FAIL'}")
    print(f"|loss diff| = {loss_diff:.2e}, max |grad diff| (sampled) = {grad_diff:.2e} (target <= 1e-5): "
          f"{'PASS' if values_ok else 'FAIL'}")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"args": vars(args), "results": results, "ratio": ratio, "loss_diff": loss_diff,
                       "grad_diff": grad_diff}, handle, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
