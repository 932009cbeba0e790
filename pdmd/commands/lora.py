"""``python -m pdmd lora import|export``: published LoRA files in as a student; a student out for diffusers / ComfyUI."""
from __future__ import annotations

import json
import sys

from pdmd.commands.arguments import frames, non_negative_float, pixels, positive_float
from pdmd.core.schedule import PhaseSchedule, ScheduleError
from pdmd.students import StudentError
from pdmd.students.lora_formats import EXPORT_LAYOUTS, export_student, make_published_student
from pdmd.students.manifest import Manifest


def add_arguments(parser) -> None:
    sub = parser.add_subparsers(dest="action", required=True)
    made = sub.add_parser("import", help="published per-phase LoRA files -> a student folder of a teacher",
                          description="Phase k gets the k-th --files entry (diffusers, ComfyUI or kohya layout).")
    made.add_argument("--teacher", required=True, metavar="ID_OR_PATH", help="diffusers pipeline folder or Hub id")
    made.add_argument("--files", nargs="+", required=True, help="one .safetensors per phase, in phase order")
    made.add_argument("--strengths", nargs="+", type=non_negative_float, help="one per phase (default 1)")
    made.add_argument("--boundaries", default="", help="phase boundaries, e.g. '0.87' (Wan2.2-Lightning)")
    made.add_argument("--steps", default=None, help="steps per phase, e.g. '2, 2' or '2' for all (default 2)")
    made.add_argument("--shift", type=positive_float, help="timestep shift (default: the teacher's)")
    made.add_argument("--cfg", type=non_negative_float, default=1.0, help="student CFG (Lightning: 1)")
    made.add_argument("--out", required=True, help="the student folder to write")
    made.add_argument("--height", type=pixels)
    made.add_argument("--width", type=pixels)
    made.add_argument("--frames", type=frames, help="video frames (Wan)")
    out = sub.add_parser("export", help="a student's per-phase LoRAs as diffusers or ComfyUI files")
    out.add_argument("--student", required=True, help="student folder (manifest.json + one LoRA per phase)")
    out.add_argument("--layout", choices=EXPORT_LAYOUTS, default="comfyui")
    out.add_argument("--out", required=True, help="folder for the files and export.json")
    out.add_argument("--with-style", action="store_true",
                     help="a student of a teacher with style LoRAs: phase files that include the style, to load "
                          "alone (default: phase files to load on top of the style LoRA, copied beside them)")


def run(args) -> int:
    try:
        if args.action == "export":
            written = export_student(args.student, args.out, args.layout, include_style=args.with_style)
            print(json.dumps({"out": args.out, "files": [str(p) for p in written], "layout": args.layout,
                              "with_style": args.with_style}))
            return 0
        from pdmd.teachers import load_teacher

        options = {k: v for k, v in {"height": args.height, "width": args.width, "num_frames": args.frames}.items()
                   if v is not None}
        teacher = load_teacher(args.teacher, **options)
        schedule = PhaseSchedule.parse(args.boundaries, steps=args.steps or "2",
                                       shift=str(args.shift or teacher.default_shift))
        folder = make_published_student(args.out, args.files, teacher, schedule, args.strengths, args.cfg,
                                        teacher_id=args.teacher)
    except (StudentError, ScheduleError, ValueError, OSError) as err:
        print(f"python -m pdmd lora {args.action}: error: {err}", file=sys.stderr)
        return 2
    manifest = Manifest.read(folder)
    print(json.dumps({"out": str(folder), "schedule": manifest.schedule.as_dict(),
                      "networks": list(manifest.networks) if manifest.networks else None,
                      "strengths": manifest.published["strengths"]}))
    return 0
