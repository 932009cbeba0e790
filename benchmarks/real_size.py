"""Real size on the CPU: the real Wan 2.1-1.3B and SD3.5-medium transformers (built from the shipped config files,
random weights) distilled for a few phased steps through the ordinary Trainer, measured peak RSS next to the
plan's prediction for the same settings. Text encoders and VAE are small stand-ins with the real output widths
(the transformer is what matters); the prediction counts those stand-ins as they are.

    python benchmarks/real_size.py                      # every model x fp32, bf16, int8 (one process each)
    python benchmarks/real_size.py --models wan2.1-1.3b --dtypes bf16

Each setting runs in a fresh process with 1 thread and reports two measured peaks:
- allocated: the bytes of the teacher's tensors plus the most bytes that tensors created during training held at
  once (``LivePeak`` on the real tensors: the CPU's counterpart of ``torch.cuda.max_memory_allocated``, the figure
  the GPU check compares with);
- RSS: the process's VmHWM during training (reset after the model is built) minus its resident memory before
  anything was built. It also holds what the allocator keeps: glibc raises its mmap threshold to the size of each
  freed block (up to 32 MiB), so weight-sized temporaries (int8's per-call bf16 copies) land in the heap and stay
  mapped. ``--glibc-fixed-mmap`` fixes the threshold (MALLOC_MMAP_THRESHOLD_) so freed blocks go back to the OS.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

MODELS = {  # name -> (shipped checkpoint, pixels/frames distilled at)
    "wan2.1-1.3b": ("Wan-AI/Wan2.1-T2V-1.3B-Diffusers", dict(height=64, width=64, num_frames=5)),
    "sd3.5-medium": ("stabilityai/stable-diffusion-3.5-medium", dict(height=32, width=32)),
}
DTYPES = ("fp32", "bf16", "int8")


def rss_bytes(field: str = "VmRSS") -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def build_teacher(model: str, dtype: str, sizes: dict, device: str = "cpu"):
    """The family adapter around a pipeline whose transformer is the real architecture with random weights."""
    import torch
    from diffusers import (
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
        WanPipeline,
        WanTransformer3DModel,
    )

    from pdmd.plan.architectures import config_folder
    from pdmd.teachers import tiny
    from pdmd.teachers.quantize import quantize_networks
    from pdmd.teachers.sd3 import SD3Teacher
    from pdmd.teachers.wan import WanTeacher

    checkpoint, _ = MODELS[model]
    config = json.loads((config_folder(checkpoint) / "transformer" / "config.json").read_text())
    torch.manual_seed(0)
    # weights created directly in the storage dtype (int8 quantizes from bf16), so building peaks no higher
    storage = torch.float32 if dtype == "fp32" else torch.bfloat16
    torch.set_default_dtype(storage)
    try:
        with torch.device(device):
            if model.startswith("wan"):
                transformer = WanTransformer3DModel.from_config(config)
            elif model.startswith("flux"):
                from diffusers import FluxTransformer2DModel
                transformer = FluxTransformer2DModel.from_config(config)
            else:
                transformer = SD3Transformer2DModel.from_config(config)
    finally:
        torch.set_default_dtype(torch.float32)
    keep = transformer._keep_in_fp32_modules or ()
    for name, module in transformer.named_modules():
        if storage != torch.float32 and any(part in keep for part in name.split(".")):
            module.float()
    if model.startswith("wan"):
        pipe = WanPipeline(tokenizer=tiny.t5_tokenizer(), text_encoder=tiny._t5_encoder(config["text_dim"], umt5=True),
                           vae=_wan_vae(),
                           scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), transformer=transformer)
        teacher = WanTeacher(pipe, checkpoint, device=device, **sizes)
    elif model.startswith("flux"):
        from diffusers import FluxPipeline

        from pdmd.teachers.flux import FluxTeacher
        pipe = FluxPipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                            vae=tiny._image_vae(16, scaling_factor=0.3611, shift_factor=0.1159),
                            text_encoder=tiny._clip_text(False, hidden=config["pooled_projection_dim"]),
                            tokenizer=tiny.clip_tokenizer(),
                            text_encoder_2=tiny._t5_encoder(config["joint_attention_dim"]), tokenizer_2=tiny.t5_tokenizer())
        teacher = FluxTeacher(pipe, checkpoint, device=device, **sizes)
    else:
        pipe = StableDiffusion3Pipeline(
            transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
            vae=tiny._image_vae(16, scaling_factor=1.5305, shift_factor=0.0609),
            text_encoder=tiny._clip_text(True, projection=768), tokenizer=tiny.clip_tokenizer(),
            text_encoder_2=tiny._clip_text(True, projection=1280), tokenizer_2=tiny.clip_tokenizer(),
            text_encoder_3=tiny._t5_encoder(config["joint_attention_dim"]), tokenizer_3=tiny.t5_tokenizer())
        teacher = SD3Teacher(pipe, checkpoint, device=device, **sizes)
    quantize_networks(teacher, dtype if dtype == "int8" else "none")
    return teacher


def _wan_vae():
    from diffusers import AutoencoderKLWan
    return AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                            temperal_downsample=[False, True, True])


def train_config(model: str, dtype: str, output_dir: str, **overrides):
    from pdmd.training.config import TrainConfig
    checkpoint, sizes = MODELS[model]
    settings = dict(teacher=checkpoint, schedule={"boundaries": [0.5], "steps": [1, 1]}, updates_per_phase=1,
                    batch_size=1, fake_ratio=1, lora={"rank": 16, "alpha": 16},
                    prompts=["a red fox in the snow", "a city at night"], sample_every=10**6,
                    checkpoint_every=10**6, output_dir=output_dir, **sizes)
    return TrainConfig.from_dict({**settings, **overrides})


def measure(model: str, dtype: str) -> dict:
    """One setting, in this process: build, reset the high-water mark, train, compare with the plan."""
    import tempfile

    import torch

    from pdmd.plan.memory import PlanSettings, activation_rows, module_bytes, peaks, weight_rows
    from pdmd.plan.trace import LivePeak
    from pdmd.training.trainer import Trainer

    torch.set_num_threads(1)
    before = rss_bytes()
    started = time.perf_counter()
    teacher = build_teacher(model, dtype, MODELS[model][1])
    built_s = time.perf_counter() - started
    with tempfile.TemporaryDirectory() as folder:
        config = train_config(model, dtype, folder)
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS: the build's transient peak is not counted
        with LivePeak() as live:
            trainer = Trainer(config, teacher=teacher)
            started = time.perf_counter()
            trainer.fit(progress=False)
            train_s = time.perf_counter() - started
    measured = rss_bytes("VmHWM") - before
    allocated = live.peak + sum(module_bytes(m) for m in (teacher.model, *teacher.text_encoders, teacher.pipe.vae))
    settings = PlanSettings.from_config(config, dtype="bf16" if dtype == "int8" else dtype,
                                        quantize="int8" if dtype == "int8" else "none", device="cpu")
    rows, _ = weight_rows(settings)
    # the stand-in encoders and VAE as they are; everything else as planned for the real checkpoint
    rows = [r for r in rows if not r.name.startswith(("text encoder", "VAE"))] + activation_rows(settings)
    stand_ins = sum(module_bytes(m) for m in (*teacher.text_encoders, teacher.pipe.vae))
    predicted = peaks(rows)["training"] + stand_ins
    return {"model": model, "dtype": dtype, "steps": trainer.step, "build_s": round(built_s, 1),
            "s_per_step": round(train_s / trainer.step, 1), "allocated_gib": round(allocated / 2**30, 3),
            "rss_gib": round(measured / 2**30, 3), "planned_gib": round(predicted / 2**30, 3),
            "error_allocated": round(predicted / allocated - 1, 3), "error_rss": round(predicted / measured - 1, 3)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument("--dtypes", nargs="+", choices=DTYPES, default=list(DTYPES))
    parser.add_argument("--glibc-fixed-mmap", action="store_true",
                        help="run each setting with MALLOC_MMAP_THRESHOLD_=131072 (freed large blocks leave RSS)")
    parser.add_argument("--one", nargs=2, metavar=("MODEL", "DTYPE"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(measure(*args.one)), flush=True)
        return 0
    rows = []
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if args.glibc_fixed_mmap:
        env["MALLOC_MMAP_THRESHOLD_"] = "131072"
    print(f"{'model':14} {'dtype':6} {'s/step':>7} {'allocated GiB':>14} {'RSS GiB':>8} {'planned GiB':>12} "
          f"{'vs alloc':>9} {'vs RSS':>7}", flush=True)
    for model in args.models:
        for dtype in args.dtypes:
            done = subprocess.run([sys.executable, __file__, "--one", model, dtype], capture_output=True, text=True,
                                  env=env)
            if done.returncode:
                print(f"{model} {dtype}: failed\n{done.stderr[-2000:]}", file=sys.stderr)
                return 1
            row = json.loads(done.stdout.strip().splitlines()[-1])
            rows.append(row)
            print(f"{model:14} {dtype:6} {row['s_per_step']:7.1f} {row['allocated_gib']:14.3f} {row['rss_gib']:8.3f} "
                  f"{row['planned_gib']:12.3f} {row['error_allocated']:+9.1%} {row['error_rss']:+7.1%}", flush=True)
    print(json.dumps(rows))
    return 0


# the GPU run (gpu_check.py --real-size): sizes as users train them; the tiny VAEs halve the resolution, so the
# pixel sizes below are chosen to give the latent the real VAE (x8) would give at the named resolution
GPU_CASES = [  # (model, dtype, sizes, what it stands for)
    ("wan2.1-1.3b", "bf16", dict(height=240, width=416, num_frames=33), "480x832x33"),
    ("sd3.5-medium", "bf16", dict(height=256, width=256), "1024x1024"),
    ("flux.1-dev", "int8", dict(height=256, width=256), "1024x1024, int8 base"),
]
MODELS["flux.1-dev"] = ("black-forest-labs/FLUX.1-dev", dict(height=256, width=256))


def run_on_gpu(dry_run: bool = False, updates_per_phase: int = 2) -> int:
    """Each case: build on CUDA, a few phased steps, s/step and torch.cuda peak next to the plan's training peak
    (the stand-in encoders counted as they are). ``dry_run`` prints the plan side only."""
    import tempfile

    import torch

    from pdmd.plan.memory import PlanSettings, activation_rows, module_bytes, peaks, weight_rows
    from pdmd.training.trainer import Trainer

    if not dry_run and not torch.cuda.is_available():
        print("gpu_check --real-size: no CUDA device here (use --dry-run for the plan side)", file=sys.stderr)
        return 2
    print(f"{'case':32} {'s/step':>7} {'peak GiB':>9} {'planned GiB':>12}", flush=True)
    for model, dtype, sizes, label in GPU_CASES:
        MODELS[model] = (MODELS[model][0], sizes)
        with tempfile.TemporaryDirectory() as folder:
            config = train_config(model, dtype, folder, updates_per_phase=updates_per_phase, gradient_checkpointing=True)
            settings = PlanSettings.from_config(config, dtype="bf16", device="cuda",
                                                quantize="int8" if dtype == "int8" else "none")
            rows = [r for r in weight_rows(settings)[0] if not r.name.startswith(("text encoder", "VAE"))]
            planned = peaks(rows + activation_rows(settings))["training"]
            if dry_run:
                print(f"{model + ' ' + label:32} {'-':>7} {'-':>9} {planned / 2**30:12.2f}", flush=True)
                continue
            teacher = build_teacher(model, dtype, sizes, device="cuda")
            planned += sum(module_bytes(m) for m in (*teacher.text_encoders, teacher.pipe.vae))
            trainer = Trainer(config, teacher=teacher)
            trainer.train_step()  # warm-up
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            started = time.perf_counter()
            while trainer.step < config.total_updates:
                trainer.train_step()
            torch.cuda.synchronize()
            seconds = (time.perf_counter() - started) / (config.total_updates - 1)
            peak = torch.cuda.max_memory_allocated()
            print(f"{model + ' ' + label:32} {seconds:7.2f} {peak / 2**30:9.2f} {planned / 2**30:12.2f}", flush=True)
            del trainer, teacher
            torch.cuda.empty_cache()
            from accelerate.state import AcceleratorState
            AcceleratorState._reset_state(reset_partial_state=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
