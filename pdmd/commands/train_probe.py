"""``python -m pdmd train-probe``: train the metrics probe (pdmd.builtin.metrics.Probe) on generated scenes.

A few minutes on one CPU core; the probe is saved as safetensors + json under --out (assets/probe).
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch
from torch.nn.functional import cross_entropy, mse_loss

from pdmd.builtin import scenes
from pdmd.builtin.metrics import HEADS, PROBE_DIR, Probe, geometry_targets, probe_outputs, save_probe
from pdmd.commands.arguments import seed

# Training batches use seeds TRAIN_SEED_BASE + step; held-out images come from a seed no step reaches.
TRAIN_SEED_BASE = 2_000_000
HELD_OUT_SEED = 7_777_777
# Generated images are slightly imperfect; light pixel noise keeps the probe judging shape and colour.
AUGMENT_NOISE = 0.03


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, default=PROBE_DIR)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch", type=int, default=96)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=seed, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")


def held_out_accuracy(probe: Probe, n: int = 1024, seed: int = HELD_OUT_SEED) -> dict[str, float]:
    images, labels = scenes.make_batch(n, seed)
    predicted = probe_outputs(probe.eval(), images)
    return {name: float((predicted[name] == labels[name]).float().mean()) for name in HEADS}


def run(args: argparse.Namespace) -> int:
    if args.steps <= 0 or args.batch <= 0:
        print("python -m pdmd train-probe: error: --steps and --batch must be positive", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    probe = Probe().train()
    optimizer = torch.optim.AdamW(probe.parameters(), lr=args.lr, weight_decay=1e-4)
    began = time.time()
    for step in range(args.steps):
        for group in optimizer.param_groups:
            group["lr"] = args.lr * 0.5 * (1 + math.cos(math.pi * step / args.steps))
        generator = torch.Generator().manual_seed(TRAIN_SEED_BASE + args.seed * 100_000 + step)
        labels = scenes.sample_labels(args.batch, generator)
        images = scenes.render(labels)
        images = images + AUGMENT_NOISE * torch.rand(1, generator=generator) * torch.randn(images.shape, generator=generator)
        logits, geometry, _ = probe(images.clamp(0, 1))
        loss = sum(cross_entropy(logits[name], labels[name]) for name in HEADS)
        loss = loss + 5 * mse_loss(geometry, geometry_targets(labels))  # MSE of ~0.01 matters as much as CE
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if (step + 1) % 100 == 0:
            print(f"step {step + 1} loss {loss.item():.4f}", flush=True)
    seconds = time.time() - began
    accuracy = held_out_accuracy(probe)
    print(f"held-out accuracy {accuracy}, {seconds:.0f} s", flush=True)
    save_probe(probe.eval(), args.out, {"trained_steps": args.steps, "train_seconds": round(seconds),
                                        "held_out_accuracy": accuracy,
                                        "command": "python -m pdmd " + " ".join(sys.argv[1:])})
    return 0
