"""``python -m pdmd sample``: render one prompt with a teacher, or with a student folder on top of its teacher.

The teacher is ``builtin``, a diffusers pipeline folder or a Hub id; video teachers (Wan) write .mp4 or .gif.
``--image`` gives a teacher that takes one (Wan 2.2 TI2V-5B: the first frame), or a student distilled on condition
images, its image, read and checked by ``pdmd.conditions.open_image`` before any model loads; a student takes an
image exactly when its manifest says it was distilled on them (``conditions``).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from pdmd.commands.arguments import frames, non_negative_float, pixels, positive_int, seed, teacher_lora
from pdmd.conditions import open_image
from pdmd.core.schedule import PhaseSchedule
from pdmd.media import VIDEO_SUFFIXES, save_media
from pdmd.students import StudentError
from pdmd.students.folder import check_images, load_student
from pdmd.students.manifest import Manifest
from pdmd.teachers import load_teacher


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--teacher", default=None, metavar="ID_OR_PATH",
                        help="'builtin', a diffusers pipeline folder or a Hub id (default: the student's, else builtin)")
    parser.add_argument("--student", help="student folder (manifest.json + one LoRA per phase)")
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--image", action="append", metavar="FILE",
                        help="PNG, JPEG or WebP for a teacher that takes an image (Wan I2V: the first frame; FLUX "
                             "Kontext, Qwen-Image-Edit: the image to edit) or a student distilled on condition images; "
                             "repeat it for a teacher that composes several (Qwen-Image-Edit-Plus: up to 3)")
    parser.add_argument("--seed", type=seed, default=0)
    parser.add_argument("--steps", type=positive_int, help="teacher steps (default: the teacher's)")
    parser.add_argument("--cfg", type=non_negative_float, help="guidance (default: the teacher's or the student's)")
    parser.add_argument("--out", required=True, help="output .png (a video teacher: .mp4 or .gif too)")
    parser.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), help="teacher weights (default: bf16 on CUDA)")
    parser.add_argument("--offload", action="store_true", help="keep text encoders and VAE on the CPU")
    parser.add_argument("--height", type=pixels, help="pixels (default: the pipeline's)")
    parser.add_argument("--width", type=pixels, help="pixels (default: the pipeline's)")
    parser.add_argument("--frames", type=frames, help="video frames (Wan; default: the pipeline's)")
    parser.add_argument("--teacher-lora", type=teacher_lora, action="append", metavar="FILE[:STRENGTH][:NETWORK]",
                        help="a style LoRA fused into the teacher, strength 0-2 (default 1), network transformer "
                             "(default) or transformer_2 (Wan 2.2 A14B's low-noise one); repeatable (default: the "
                             "student's own)")


def run(args: argparse.Namespace) -> int:
    def fail(message: str) -> int:
        print(f"python -m pdmd sample: error: {message}", file=sys.stderr)
        return 2

    loading = {"dtype": args.dtype, "offload": args.offload, "height": args.height, "width": args.width,
               "num_frames": args.frames, "teacher_loras": tuple(args.teacher_lora or ())}
    loading = {k: v for k, v in loading.items() if v not in (None, False, ())}
    prompts = [args.prompt]
    try:
        opened = [open_image(path) for path in args.image or ()]  # the prompt's image, or its several
        images = None if not opened else [opened[0] if len(opened) == 1 else tuple(opened)]
        if args.student:
            manifest = Manifest.read(args.student)  # the resolution it was distilled at, unless told otherwise
            check_images(args.student, manifest, images)
            options = {**({} if args.teacher else manifest.teacher_load_options(args.student)), **loading}
            student = load_student(args.student, load_teacher(args.teacher or manifest.teacher, **options), manifest)
            teacher, schedule, cfg, experts = student.roles.teacher, student.schedule, student.cfg, student.experts
        else:
            teacher = load_teacher(args.teacher or "builtin", **loading)
            schedule = PhaseSchedule.uniform(args.steps or teacher.default_steps, teacher.default_shift)
            cfg, experts = teacher.default_cfg, None
    except (StudentError, ValueError, OSError) as err:
        return fail(str(err))
    suffix = Path(args.out).suffix.lower()
    if suffix not in ((".png",) + VIDEO_SUFFIXES if teacher.is_video else (".png",)):
        kind = "videos: write .mp4, .gif or .png (frames side by side)" if teacher.is_video else "images: write a .png"
        return fail(f"--out {args.out}: {teacher.name} makes {kind}")
    cfg = cfg if args.cfg is None else args.cfg
    try:
        with torch.no_grad():
            result = teacher.sample(prompts, args.seed, schedule, cfg, experts, images=images)
            save_media(teacher.decode(result.sample), Path(args.out))
    except torch.OutOfMemoryError as err:
        from pdmd.teachers.diffusers_base import MEMORY_ADVICE
        return fail(f"out of memory while sampling ({err}): {MEMORY_ADVICE}")
    except ValueError as err:  # an image a text-only teacher refuses; .mp4 without imageio-ffmpeg
        return fail(str(err))
    print(json.dumps({"out": args.out, "nfe": result.nfe, "seed": args.seed, "schedule": schedule.as_dict()}))
    return 0
