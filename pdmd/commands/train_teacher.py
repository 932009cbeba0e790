"""``python -m pdmd train-teacher``: train the built-in teacher from scratch (or resume) on generated scenes.

Flow matching (docs/method.md §1, Eq. (4)) with condition dropout for CFG, an EMA of the weights, atomic safetensors
checkpoints in --run-dir, and after every checkpoint the EMA weights exported (fp16, diffusers format) to
--out. Every step's batch, noise and timesteps come from a generator seeded by (seed, step), so a resumed
run draws exactly what an uninterrupted one would have.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from pathlib import Path

import torch

from pdmd.builtin import scenes
from pdmd.commands.arguments import seed
from pdmd.core.rectified_flow import flow_matching_loss, forward_process
from pdmd.teachers.builtin import (
    ARCHITECTURES,
    ASSET_DIR,
    DEFAULT_ARCHITECTURE,
    TIMESTEP_SCALE,
    build_model,
    images_to_latents,
    patch_size,
)
from pdmd.training.checkpoints import (
    atomic_export,
    load_checkpoint,
    resolve_checkpoint,
    save_checkpoint,
)
from pdmd.training.optimizers import load_optimizer_tensors, optimizer_tensors

WARMUP_STEPS = 250
FINAL_LR_FRACTION = 0.1


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, default=ASSET_DIR, help="where the teacher is exported")
    parser.add_argument("--run-dir", type=Path, default=Path("runs/builtin-teacher"),
                        help="checkpoints (not shipped)")
    parser.add_argument("--arch", choices=sorted(ARCHITECTURES), default=DEFAULT_ARCHITECTURE,
                        help="network architecture (a resumed run keeps the one it started with)")
    parser.add_argument("--steps", type=int, default=12000, help="total optimizer steps")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=7e-4)
    parser.add_argument("--ema", type=float, default=0.999, help="EMA decay of the exported weights")
    parser.add_argument("--seed", type=seed, default=0)
    parser.add_argument("--checkpoint-every", type=int, default=250)
    parser.add_argument("--resume", default=None,
                        help="'latest' (newest checkpoint in --run-dir, or a fresh start if none) or a folder")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--device", default=None, help="cuda, cpu, ... (default: cuda when there is one; bf16 "
                                                       "autocast on cuda)")


def _fail(message: str) -> int:
    print(f"python -m pdmd train-teacher: error: {message}", file=sys.stderr)
    return 2


def learning_rate(step: int, total: int, peak: float) -> float:
    """Linear warm-up, then cosine decay to FINAL_LR_FRACTION of the peak."""
    if step < WARMUP_STEPS:
        return peak * (step + 1) / WARMUP_STEPS
    progress = min(1.0, (step - WARMUP_STEPS) / max(1, total - WARMUP_STEPS))
    return peak * (FINAL_LR_FRACTION + (1 - FINAL_LR_FRACTION) * 0.5 * (1 + math.cos(math.pi * progress)))


def training_loss(model, step_seed: int, batch: int) -> torch.Tensor:
    # every random draw on the CPU from one seeded generator: the same batch on any device, and on resume
    generator = torch.Generator().manual_seed(step_seed)
    device = next(model.parameters()).device
    labels = scenes.sample_labels(batch, generator)
    class_labels = scenes.drop_attributes(labels, generator).to(device)
    x0 = images_to_latents(scenes.render({k: v.to(device) for k, v in labels.items()}), patch_size(model))
    eps = torch.randn(x0.shape, generator=generator).to(device)
    # uniform timesteps: at 32x32 the crisp edges are made at low noise, which SD3's logit-normal rarely
    # samples (its first version left ragged, speckled shapes after 2500 steps)
    t = torch.rand(batch, generator=generator).to(device)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        v = model(forward_process(x0, eps, t), t * TIMESTEP_SCALE, class_labels=class_labels).sample
    return flow_matching_loss(v.float(), x0, eps)


def export_teacher(ema_model, out: Path, info: dict) -> None:
    def write(folder: Path):
        copy.deepcopy(ema_model).cpu().half().save_pretrained(str(folder), safe_serialization=True)
        (folder / "teacher.json").write_text(json.dumps(info, indent=2))
    atomic_export(out, write)


def run(args: argparse.Namespace) -> int:
    if args.steps <= 0 or args.batch <= 0 or args.checkpoint_every <= 0:
        return _fail("--steps, --batch and --checkpoint-every must be positive")
    if args.threads:
        torch.set_num_threads(args.threads)

    checkpoint = resolve_checkpoint(args.run_dir, args.resume) if args.resume else None
    tensors, meta = load_checkpoint(checkpoint) if checkpoint is not None else ({}, {})
    # checkpoints from before --arch existed are all of the session-1 architecture
    architecture = meta.get("args", {}).get("arch", "patch2-small") if meta else args.arch
    if architecture not in ARCHITECTURES:
        return _fail(f"checkpoint {checkpoint} is of architecture {architecture!r}, which this version does not know")
    if architecture != args.arch:
        print(f"resuming a {architecture} run: --arch {args.arch} ignored", flush=True)
    args.arch = architecture

    try:
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError as err:
        return _fail(f"--device {args.device!r}: {err}")
    if device.type == "cuda" and not torch.cuda.is_available():
        return _fail("--device cuda: this machine has no CUDA device")

    torch.manual_seed(args.seed)  # initial weights
    model = build_model(architecture).to(device).train()
    ema = copy.deepcopy(model).requires_grad_(False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    start, train_seconds = 0, 0.0
    if checkpoint is not None:
        model.load_state_dict({k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")})
        ema.load_state_dict({k[len("ema."):]: v for k, v in tensors.items() if k.startswith("ema.")})
        load_optimizer_tensors(optimizer, {k[len("optim."):]: v for k, v in tensors.items()
                                           if k.startswith("optim.")})
        start, train_seconds = meta["step"], meta["train_seconds"]
        print(f"resumed from {checkpoint} at step {start}", flush=True)

    command = "python -m pdmd " + " ".join(sys.argv[1:])
    params = sum(p.numel() for p in model.parameters())
    print(f"training {params / 1e6:.2f}M parameters ({architecture}) for steps {start}..{args.steps}, "
          f"batch {args.batch}, on {device} ({torch.get_num_threads()} CPU thread(s))", flush=True)
    running_loss, last_report, last_report_step = None, time.time(), start
    for step in range(start, args.steps):
        began = time.time()
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, args.steps, args.lr)
        loss = training_loss(model, args.seed * 1_000_003 + step, args.batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        decay = min(args.ema, (1 + step) / (10 + step))  # short memory early, when weights move fast
        with torch.no_grad():
            torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1 - decay)
        train_seconds += time.time() - began
        running_loss = loss.item() if running_loss is None else 0.98 * running_loss + 0.02 * loss.item()

        done = step + 1
        if done % 50 == 0 or done == args.steps:
            print(f"step {done} loss {running_loss:.4f} lr {optimizer.param_groups[0]['lr']:.2e} "
                  f"{(time.time() - last_report) / (done - last_report_step):.2f} s/step", flush=True)
            last_report, last_report_step = time.time(), done
        if done % args.checkpoint_every == 0 or done == args.steps:
            tensors = {**{f"model.{k}": v for k, v in model.state_dict().items()},
                       **{f"ema.{k}": v for k, v in ema.state_dict().items()},
                       **{f"optim.{k}": v for k, v in optimizer_tensors(optimizer).items()}}
            meta = {"train_seconds": train_seconds, "loss": running_loss, "args": {
                k: str(v) for k, v in vars(args).items() if k != "run"}}
            saved = save_checkpoint(args.run_dir, done, tensors, meta)
            export_teacher(ema, args.out, {"architecture": architecture, "trained_steps": done,
                                           "train_seconds": round(train_seconds), "device": device.type,
                                           "threads": torch.get_num_threads(), "batch": args.batch,
                                           "command": command})
            print(f"checkpoint {saved}, exported {args.out}", flush=True)
    return 0
