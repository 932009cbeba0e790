"""GPU check for the real-teacher families: on a CUDA machine, each family's tiny pipeline (random weights, real
diffusers classes, pdmd/teachers/tiny.py) is loaded in bf16, sampled and distilled for a few phased steps;
prints sampling and training it/s and peak GPU memory. The whole run takes well under 10 minutes.

    python benchmarks/gpu_check.py                 # every family, on CUDA
    python benchmarks/gpu_check.py --cpu --steps 2 # a smoke run on the CPU (fp32 unless --dtype bf16)
    python benchmarks/gpu_check.py --real-size     # real architectures, random weights (benchmarks/real_size.py)
    python benchmarks/gpu_check.py --real-size --dry-run   # only the plan's predictions (no GPU needed)

The numbers time the code path (placement, dtype, LoRA roles, the trainer loop), not the real models' speed.
After the families, each case below runs in its own try and prints one line, memory released between them:

- the training paths of PATH_CASES on the tiny SD3 pipeline: an int8 base loaded through from_pretrained, fp16
  autocast with a GradScaler, offloaded text encoders and VAE, samples during training with the text encoders
  released, and a resume with EMA compared with an unbroken run; s/update and peak memory each;
- zero-gpu showcase: the Showcase's ZeroGPU call path with the pickling ``spaces`` stand-in
  (tests/zero_gpu_standin): examples/showcase.yaml's pairs through the tab's handlers, every sampling call's
  arguments and results pickled across, the models kept in RAM and moved onto the GPU by the call.
"""
from __future__ import annotations

import argparse
import gc
import importlib
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

from pdmd.conditions import open_image
from pdmd.core.schedule import PhaseSchedule
from pdmd.teachers import load_teacher
from pdmd.teachers.tiny import BUILDERS, build
from pdmd.training.config import TrainConfig
from pdmd.training.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]
SIZES = {"wan2.1": dict(height=32, width=32, num_frames=9), "wan2.2": dict(height=32, width=32, num_frames=9),
         "qwen-image": dict(height=64, width=64), "hunyuan-video-1.5": dict(height=32, width=32, num_frames=5),
         "wan2.2-ti2v": dict(height=32, width=64, num_frames=5), "wan2.1-i2v": dict(height=16, width=32, num_frames=5),
         "wan2.2-i2v": dict(height=16, width=32, num_frames=5),
         "qwen-image-edit-plus": dict(height=32, width=64)}
DEFAULT_SIZE = dict(height=32, width=32)


def peak_mb(device: torch.device) -> float:
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else float("nan")


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def check(family: str, folder: Path, device: torch.device, dtype: str, steps: int, sample_steps: int,
          run_dir: Path) -> dict:
    sizes = SIZES.get(family, DEFAULT_SIZE)
    started = time.perf_counter()
    teacher = load_teacher(str(folder), device=device, dtype=dtype, **sizes)
    load_s = time.perf_counter() - started
    schedule = PhaseSchedule.uniform(sample_steps, teacher.default_shift)
    prompts = ["a red fox in the snow", "a city at night"]
    # a conditioned teacher (image-to-video, editing) samples and trains on an image per prompt
    pictures = condition_folder(teacher, run_dir / f"{family}-images", prompts) if teacher.conditions else None
    images = [open_image(path) for path in sorted(pictures.glob("*.png"))] if pictures else None
    teacher.sample(prompts, seed=0, schedule=PhaseSchedule.uniform(1), images=images)  # warm-up (kernels, allocator)
    reset_peak(device)
    started = time.perf_counter()
    result = teacher.sample(prompts, seed=0, schedule=schedule, images=images)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    sample_s = time.perf_counter() - started
    sample_peak = peak_mb(device)
    assert torch.isfinite(result.sample).all(), f"{family}: non-finite teacher sample"

    config = TrainConfig.from_dict(dict(
        teacher=str(folder), method="phased", schedule={"boundaries": [0.8], "steps": [2, 2]},
        updates_per_phase=max(1, steps // 2), batch_size=2, fake_ratio=2, lora={"rank": 8, "alpha": 8},
        prompts=prompts, sample_every=10**6, checkpoint_every=10**6, gradient_checkpointing=True,
        output_dir=str(run_dir / family), dtype=dtype, **sizes,
        **({"condition_images": str(pictures)} if pictures else {})))
    trainer = Trainer(config, teacher=teacher)
    reset_peak(device)
    started = time.perf_counter()
    trainer.fit(progress=False)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    train_s = time.perf_counter() - started
    from accelerate.state import AcceleratorState
    AcceleratorState._reset_state(reset_partial_state=True)
    return {"family": family, "device": device.type, "dtype": dtype, "images": bool(images), "load_s": round(load_s, 2),
            "sample_it_per_s": round(result.nfe / sample_s, 1), "sample_peak_mb": round(sample_peak, 1),
            "train_steps": trainer.step, "train_it_per_s": round(trainer.step / train_s, 2),
            "train_peak_mb": round(peak_mb(device), 1)}


def condition_folder(teacher, folder: Path, prompts: list[str]) -> Path:
    """Random images at the teacher's size, one per prompt, with their prompts.txt (condition_images' layout)."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(0)
    for k in range(len(prompts)):
        pixels = torch.randint(0, 256, (teacher.height, teacher.width, 3), generator=generator, dtype=torch.uint8)
        Image.fromarray(pixels.numpy()).save(folder / f"{k:02d}.png")
    (folder / "prompts.txt").write_text("\n".join(prompts) + "\n")
    return folder


# The code paths issue 24 fixed, each a short phased run of the tiny SD3 pipeline: config changes from the plain one.
PATH_CASES = {
    "int8 base (from_pretrained, torchao)": dict(quantize="int8"),
    "fp16 autocast, fp16 base, GradScaler": dict(dtype="fp16", mixed_precision="fp16"),
    "offloaded text encoders and VAE": dict(offload=True),
    "samples during training (encoders released)": dict(sample_every=1, sample_prompts=["a red fox"]),
    "resume with EMA": dict(ema_decay=0.9),
}


def training_path(name: str, folder: Path, device: torch.device, dtype: str, run_dir: Path) -> str:
    """One PATH_CASES case on ``folder``: s/update and peak memory; "resume with EMA" stops half-way, resumes in a
    fresh Trainer and compares the adapters with an unbroken run (equal on the CPU, within float tolerance on CUDA)."""
    from accelerate.state import AcceleratorState

    def config(out: str, **more) -> TrainConfig:
        return TrainConfig.from_dict({**dict(
            teacher=str(folder), method="phased", schedule={"boundaries": [0.8], "steps": [2, 2]}, updates_per_phase=2,
            batch_size=2, fake_ratio=1, lora={"rank": 4, "alpha": 4}, prompts=["a red fox", "a city at night"],
            sample_every=10**6, checkpoint_every=1, output_dir=str(run_dir / out), dtype=dtype, height=32, width=32),
            **PATH_CASES[name], **more})

    def fit(trainer: Trainer, **kwargs) -> None:
        trainer.fit(progress=False, **kwargs)
        AcceleratorState._reset_state(reset_partial_state=True)

    reset_peak(device)
    started = time.perf_counter()
    unbroken = Trainer(config("unbroken"))
    fit(unbroken)
    seconds = (time.perf_counter() - started) / unbroken.step
    line = f"{seconds:.2f} s/update (load included), peak {peak_mb(device):.0f} MiB"
    if name == "resume with EMA":
        fit(Trainer(config("split")), max_steps=2)
        resumed = Trainer(config("split"))
        resumed.resume("latest")
        fit(resumed)
        a, b = unbroken.roles.tensors(), resumed.roles.tensors()
        gap = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
        line += f"; resumed vs unbroken adapters and EMA: max |diff| {gap:.2e}"
    return line


def zero_gpu_showcase(where: Path) -> str:
    """The Showcase tab's handlers on examples/showcase.yaml's tiny pairs, as on a ZeroGPU Space: ``spaces`` is the
    pickling stand-in, so each sampling call gets its arguments and hands back its result through pickle; the
    models stay in RAM (ui.models.placement) and the call moves its model to the GPU. One line: the pairs' NFE,
    the GPU seconds each call asked for and where the models ended up."""
    sys.path.insert(0, str(ROOT / "tests" / "zero_gpu_standin"))
    sys.path.insert(0, str(ROOT / "examples"))
    import build_showcase
    import spaces

    import ui.gpu
    importlib.reload(ui.gpu)  # declares the GPU call with the stand-in, whatever imported ui.gpu before
    from pdmd.showcase import Showcase
    from ui.showcase import ShowcaseStore, on_student, on_teacher

    build_showcase.build(where / "showcase-models")
    shutil.copy(ROOT / "examples" / "showcase.yaml", where / "showcase.yaml")
    store = ShowcaseStore(Showcase.read(where / "showcase.yaml"))
    spaces.calls.clear()
    parts = []
    for pair in ("tiny-sd3/phased", "tiny-wan22/lightning-style"):
        started = time.perf_counter()
        *_, status, run = on_student(store, pair, "a red cat on a sofa", 0, 1.0, 1.0)
        assert run is not None, f"{pair}: {status}"
        teacher = on_teacher(store, run, 8, 4.0)
        assert teacher[-1] == "Done.", f"{pair}: {teacher[-1]}"
        device = store.teacher(store.showcase.pair(pair)[0].model).device.type
        parts.append(f"{pair}: student NFE {run['nfe']}, teacher {teacher[2].rpartition('— ')[2]}, models then on "
                     f"{device}, {time.perf_counter() - started:.1f} s in all")
    asked = ", ".join(f"{seconds} s" for _, seconds in spaces.calls)
    assert [name for name, _ in spaces.calls] == ["_sample_side"] * 4, spaces.calls
    return f"ok: {'; '.join(parts)}; 4 calls through the pickling spaces.GPU, asking {asked}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu", action="store_true", help="run on the CPU (a smoke run; no CUDA needed)")
    parser.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), help="default: bf16 on CUDA, fp32 on the CPU")
    parser.add_argument("--families", nargs="+", default=list(BUILDERS), choices=list(BUILDERS))
    parser.add_argument("--steps", type=int, default=20, help="generator steps of the distillation (2 phases)")
    parser.add_argument("--sample-steps", type=int, default=8)
    parser.add_argument("--real-size", action="store_true",
                        help="Wan 2.1-1.3B 480x832x33, SD3.5-medium 1024^2, FLUX.1-dev 1024^2 int8: s/step and peak vs plan")
    parser.add_argument("--dry-run", action="store_true", help="with --real-size: print the plan's side only")
    args = parser.parse_args(argv)
    if args.real_size:
        from real_size import run_on_gpu  # benchmarks/ is on sys.path when this runs as a script
        return run_on_gpu(dry_run=args.dry_run)
    if not args.cpu and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; run it on a GPU machine, or pass --cpu for a smoke run",
              file=sys.stderr)
        return 2
    device = torch.device("cpu" if args.cpu else "cuda")
    dtype = args.dtype or ("fp32" if args.cpu else "bf16")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"# gpu_check on {name}, {dtype}, torch {torch.__version__}")
    print(f"{'family':14} {'load s':>7} {'sample it/s':>12} {'sample MiB':>11} {'train it/s':>11} {'train MiB':>10}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for family in args.families:
            folder = build(family, Path(tmp) / family)
            row = check(family, folder, device, dtype, args.steps, args.sample_steps, Path(tmp) / "runs")
            rows.append(row)
            print(f"{family:14} {row['load_s']:7.2f} {row['sample_it_per_s']:12.1f} {row['sample_peak_mb']:11.1f} "
                  f"{row['train_it_per_s']:11.2f} {row['train_peak_mb']:10.1f}", flush=True)
        failed = False
        sd3 = build("sd3", Path(tmp) / "paths-sd3")
        for name in PATH_CASES:
            try:
                print(f"{name}: ok: {training_path(name, sd3, device, dtype, Path(tmp) / 'paths')}", flush=True)
            except Exception as err:  # noqa: BLE001  (a case's failure is its line; the other cases still run)
                print(f"{name}: FAILED: {type(err).__name__}: {err}", flush=True)
                failed = True
            finally:
                gc.collect()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
        try:
            print(f"zero-gpu showcase: {zero_gpu_showcase(Path(tmp) / 'showcase')}", flush=True)
        except Exception as err:  # noqa: BLE001  (a case's failure is its line; the other cases still run)
            print(f"zero-gpu showcase: FAILED: {type(err).__name__}: {err}", flush=True)
            failed = True
    print(json.dumps(rows))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
