"""Levers on the network itself, for the training step's forward + backward: memory format, bf16, torch.compile.

    python benchmarks/network_levers.py --threads 1 --batch 4

Times one forward + backward of the built-in teacher with a LoRA adapter active (what every fake-score and
generator update runs), median of --repeats after a warm-up, in one process so the variants share the machine's
state; torch.compile's own compile time is reported beside its step time. Prints a markdown table.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from pdmd.students.manifest import LoraSpec
from pdmd.students.roles import Roles
from pdmd.teachers import load_teacher


def step_seconds(velocity, x, t, cond, params, repeats: int) -> float:
    def once():
        velocity(x, t, cond).square().mean().backward()
        for p in params:
            p.grad = None
    once()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        once()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--compile", action="store_true", help="also time torch.compile (minutes to compile)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    teacher = load_teacher("builtin")
    roles = Roles(teacher, ["expert"], LoraSpec(rank=16, alpha=16))
    params = roles.parameters_of("expert")
    for p in params:
        p.requires_grad_(True)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn((args.batch, *teacher.latent_shape), generator=generator)
    t = torch.rand(args.batch, generator=generator)
    cond, _ = teacher.encode_prompts(list(teacher.default_prompts[: args.batch]))
    velocity = roles.velocity("expert")

    rows = [("contiguous (as trained)", step_seconds(velocity, x, t, cond, params, args.repeats), None)]
    teacher.model.to(memory_format=torch.channels_last)
    rows.append(("channels_last weights and input", step_seconds(
        velocity, x.contiguous(memory_format=torch.channels_last), t, cond, params, args.repeats), None))
    teacher.model.to(memory_format=torch.contiguous_format)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # what mixed_precision: bf16 runs on the CPU
        rows.append(("bf16 autocast", step_seconds(velocity, x, t, cond, params, args.repeats), None))
    if args.compile:
        started = time.perf_counter()
        teacher.model.forward = torch.compile(teacher.model.forward)
        velocity(x, t, cond).square().mean().backward()  # the compile happens here
        compile_seconds = time.perf_counter() - started
        rows.append(("torch.compile (inductor)", step_seconds(velocity, x, t, cond, params, args.repeats),
                     compile_seconds))
    base = rows[0][1]
    print(f"| variant ({args.threads} thread(s), batch {args.batch}) | forward + backward | vs contiguous | compile |")
    print("|---|---|---|---|")
    for name, seconds, compiled in rows:
        print(f"| {name} | {1000 * seconds:.1f} ms | {base / seconds:.2f}x | "
              f"{'' if compiled is None else f'{compiled:.0f} s'} |")


if __name__ == "__main__":
    main()
