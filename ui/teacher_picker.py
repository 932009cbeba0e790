"""The teacher picker: the built-in teacher, a loaded one, or a diffusers pipeline folder / Hub id typed in."""
from __future__ import annotations

import gradio as gr

from pdmd.limits import MAX_TEACHER_STEPS
from pdmd.plan.architectures import shipped_checkpoints
from pdmd.students import StudentError
from pdmd.teachers import BUILTIN, PIPELINES, teacher_key
from pdmd.teachers.base import TeacherError
from ui import students
from ui.inputs import InputError, error_markdown, load_options, teacher_lora_options
from ui.models import ModelStore

LOAD_ERRORS = (TeacherError, StudentError, OSError, RuntimeError)  # a folder of any kind can be typed in


# offered in the teacher pickers besides 'builtin' and the teachers already loaded: the checkpoints whose
# architectures ship in assets/architectures (each family's published ones, image-to-video ones included: Compare
# takes an image for them; each loads from the Hub, or from a local folder typed into the box next to the picker)
SUGGESTED_TEACHERS = tuple(shipped_checkpoints())


def supported_pipelines() -> str:
    """The diffusers pipelines a typed folder or Hub id may hold, for the pickers' help text."""
    return ", ".join(name.removesuffix("Pipeline") for name in PIPELINES)


def teacher_pick(value) -> tuple[str, dict]:
    """The teacher state -- ``{"name", "options"}``, or a bare name -- as (name, load options)."""
    if isinstance(value, dict):
        return value.get("name") or BUILTIN, dict(value.get("options") or {})
    return value or BUILTIN, {}


def teacher_choices(store: ModelStore) -> list[str]:
    return list(dict.fromkeys([BUILTIN, *store.loaded_teachers(), *SUGGESTED_TEACHERS]))


def on_load_teacher(store: ModelStore, picked, typed, height=None, width=None, frames=None, lora_file=None,
                    lora_strength=1.0):
    """Outputs: the teacher state, status, the student picker (that teacher's students), teacher steps and CFG
    sliders (its own defaults), the teacher picker (now listing it), the image input (shown, emptied, for a
    teacher that takes an image; hidden and emptied otherwise). A typed folder or Hub id wins over the picker.
    ``lora_file`` / ``lora_strength``: an optional style LoRA fused into the teacher (base + style)."""
    name = (typed or "").strip() or picked or BUILTIN
    try:
        options = {**load_options(height, width, frames),
                   **teacher_lora_options(lora_file, lora_strength, allowed=store.other_teachers)}
        teacher = store.teacher(name, options)
    except (InputError, *LOAD_ERRORS) as err:
        return (gr.skip(),) + (error_markdown(f"Teacher not loaded: {err}"),) + (gr.skip(),) * 5
    name = teacher_key(name)[0]  # a folder by its full path, as the picker lists it
    size = teacher.options()
    kind = ("built-in 32×32 scenes" if teacher.family is None else
            f"{teacher.family}, {'video' if teacher.is_video else 'images'} {size['height']}×{size['width']}"
            + (f", {size['num_frames']} frames" if "num_frames" in size else ""))
    experts = f"; experts {', '.join(teacher.network_names)}" if teacher.network_names else ""
    style = "".join(f" + style LoRA {lora.describe()}" for lora in teacher.style_loras)
    takes_image = "image" in teacher.conditions
    needs = (" It samples from an image: upload one under the prompt." if teacher.needs_conditions else
             " It takes an image under the prompt (optional)." if takes_image else "")
    status = (f"✓ Teacher **{name}**{style} ({kind}{experts}): {teacher.default_steps} steps, CFG "
              f"{teacher.default_cfg:g} by default.{needs}")
    choices = students.picker_choices(name)
    return ({"name": name, "options": options}, status,
            gr.update(choices=choices, value=students.default_choice(name, choices)),
            gr.update(value=min(teacher.default_steps, MAX_TEACHER_STEPS)), gr.update(value=teacher.default_cfg),
            gr.update(choices=teacher_choices(store), value=name), gr.update(visible=takes_image, value=None))

