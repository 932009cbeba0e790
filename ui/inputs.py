"""Form values and API arguments into checked values, and errors into one visible line: every tab's handlers
use these, so a value posted straight to the API meets the same checks as one typed into the page."""
from __future__ import annotations

import html
import math
import random
import re
import tempfile
from pathlib import Path

from pdmd import limits
from pdmd.builtin.scenes import PromptError, parse_prompt
from pdmd.conditions import ConditionError, open_image
from pdmd.core.schedule import PhaseSchedule, ScheduleError
from pdmd.paths import ROOT, runs_dir
from pdmd.students import StudentError
from pdmd.teachers import BUILTIN
from pdmd.teachers.base import TeacherError
from pdmd.teachers.style_loras import style_lora


class InputError(ValueError):
    """A form value the app cannot use; the message says which and why."""


USER_ERRORS = (InputError, StudentError, ScheduleError, PromptError, TeacherError, ConditionError)


def redact(message: str) -> str:
    """A message without this server's folders: a visitor learns which file, never where it lives."""
    places = {str(runs_dir()): "runs", str(ROOT): ".", tempfile.gettempdir(): "<tmp>", str(Path.home()): "~"}
    for place, shown in sorted(places.items(), key=lambda item: -len(item[0])):  # the longest first
        if len(place) > 1:  # a home of "/" would otherwise mangle every path separator
            message = message.replace(place, shown)
    return message


def error_markdown(message: str) -> str:
    return f"<div class='pdmd-error'>⚠️ {html.escape(redact(str(message)), quote=False)[:2000]}</div>"


def text(value, what: str, limit: int = limits.MAX_PROMPT_CHARS) -> str:
    """A text field's value: a string of at most ``limit`` characters."""
    value = "" if value is None else str(value) if isinstance(value, (int, float)) else value
    if not isinstance(value, str):
        raise InputError(f"{what} must be text")
    if len(value) > limit:
        raise InputError(f"{what} is {len(value)} characters long; the limit is {limit}")
    return value


def bounded_schedule(schedule: PhaseSchedule) -> PhaseSchedule:
    """A schedule this server samples with: at most MAX_PHASES phases and MAX_PHASES_TAB_STEPS steps."""
    if schedule.num_phases > limits.MAX_PHASES or schedule.nfe > limits.MAX_PHASES_TAB_STEPS:
        raise InputError(f"the schedule has {schedule.num_phases} phase(s) and {schedule.nfe} steps; this server "
                         f"samples at most {limits.MAX_PHASES} phases and {limits.MAX_PHASES_TAB_STEPS} steps")
    return schedule


def schedule_of(state) -> PhaseSchedule:
    """The Phases tab's schedule (a dict) as a bounded PhaseSchedule."""
    return bounded_schedule(PhaseSchedule.from_dict(state or {}))


def bounded_number(value, what: str, low: float, high: float, whole: bool = False) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise InputError(f"{what} {value!r} is not a number") from None
    if not math.isfinite(number) or not low <= number <= high:
        raise InputError(f"{what} {value!r} must lie between {low:g} and {high:g}")
    if whole and number != int(number):
        raise InputError(f"{what} {value!r} must be a whole number")
    return int(number) if whole else number


def check_prompt(prompt, teacher_name: str = BUILTIN) -> tuple[str, str]:
    """The prompt, stripped, and (for the built-in teacher, which knows a small grammar) a note listing words
    it does not know and ignores."""
    prompt = text(prompt, "the prompt").strip()
    if not prompt:
        raise InputError("the prompt is empty: describe a scene, e.g. 'a red star on a dark background'")
    if teacher_name != BUILTIN:
        return prompt, ""
    unknown = parse_prompt(prompt).unknown  # raises PromptError for "a red blue star"
    return prompt, (f"Unknown word(s) ignored: {', '.join(unknown)}." if unknown else "")


def resolve_seed(seed, randomise: bool) -> int:
    if randomise:
        return random_seed()
    return bounded_number(seed, "seed", 0, limits.MAX_SEED, whole=True)


def condition_image(value):
    """A visitor's condition image as an RGB PIL image, or None when there is none. ``value`` is the path gradio
    saved the upload to (ui.comparison.image_input hands it over unopened): pdmd.conditions.open_image checks its
    bytes, format and pixels from the header before decoding it. A refusal names the file by the name it was sent
    with, not where the server keeps it; nothing is written."""
    if value is None or value == "":
        return None
    path = text(value, "the image", limits.MAX_NAME_CHARS)
    try:
        return open_image(path)
    except ConditionError as err:
        raise InputError(str(err).replace(path, Path(path).name)) from None


def load_options(height, width, frames) -> dict:
    """Resolution and frame count for loading a teacher; blank or 0 = the pipeline's own default."""
    options = {}
    for key, value, high in (("height", height, limits.MAX_SIDE), ("width", width, limits.MAX_SIDE),
                             ("num_frames", frames, limits.MAX_FRAMES)):
        if value not in (None, "", 0):
            options[key] = bounded_number(value, key.replace("num_", ""), 1, high, whole=True)
    return options


def teacher_lora_options(file, strength, allowed: bool = True) -> dict:
    """The teacher box's optional style LoRA -- a .safetensors path on this machine and its strength -- as
    load_teacher's ``teacher_loras`` option (blank: none). ``allowed`` False (a public server, which loads no
    teacher of a visitor's choosing) refuses it before the path is looked at, so a visitor learns nothing of the
    server's files."""
    file = text(file, "the style LoRA file", limits.MAX_NAME_CHARS).strip()
    if not file:
        return {}
    if not allowed:
        raise InputError("style LoRAs are turned off on this public server; run the app yourself to fuse one into "
                         "a teacher")
    strength = bounded_number(strength, "style LoRA strength", 0, limits.MAX_STRENGTH)
    return {"teacher_loras": (style_lora(file, strength),)}


def parse_strengths(values, phases: int) -> list[float]:
    """One LoRA strength per phase, each in [0, MAX_STRENGTH]: the first ``phases`` of ``values`` (the strength
    sliders; the page shows as many as there are phases, an API call sends them all)."""
    values = list(values or ())[:phases]
    if len(values) != phases:
        raise InputError(f"{len(values)} strength(s) for {phases} phase(s): give one per phase")
    return [bounded_number(v, f"phase {k + 1} strength", 0, limits.MAX_STRENGTH) for k, v in enumerate(values)]


def phase_choices(phases: int, edges: tuple[float, ...] = ()) -> list[tuple[str, str]]:
    """Compare's "Teacher takes phase" boxes: values "phase 1", ...; labelled with each phase's t-range when the
    schedule's ``edges`` are known, so the boxes say which student they belong to."""
    if len(edges) != phases + 1:
        return [(f"phase {k + 1}", f"phase {k + 1}") for k in range(phases)]
    return [(f"phase {k + 1} (t {edges[k]:g} to {edges[k + 1]:g})", f"phase {k + 1}") for k in range(phases)]


def parse_teacher_phases(values, phases: int) -> tuple[int, ...]:
    """The phases a student hands back to the teacher, from the checked labels (phase_choices) as sorted 0-based
    indices; an unknown label or a phase the student does not have is refused, so the work stays bounded by
    the student's own phase count."""
    if values is None or values == "":
        return ()
    values = [values] if isinstance(values, str) else values
    if not isinstance(values, (list, tuple)):
        raise InputError(f"teacher phases {values!r} must be a list of labels such as ['phase 2']")
    if len(values) > phases:
        raise InputError(f"{len(values)} teacher phases for a student of {phases} phase(s)")
    chosen = set()
    for value in values:
        label = text(value, "a teacher phase", 32).strip()
        number = re.fullmatch(r"phase (\d{1,3})", label)
        if number is None or not 1 <= int(number[1]) <= phases:
            raise InputError(f"teacher phase {label!r} is not a phase of this student (phase 1 to phase {phases})")
        chosen.add(int(number[1]) - 1)
    return tuple(sorted(chosen))


def random_seed() -> int:
    return random.randint(0, limits.MAX_SEED)
