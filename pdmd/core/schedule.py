"""Phase schedules: K phases split t in [1, 0] at boundaries 1 = t_0 > t_1 > ... > t_K = 0 (docs/method.md §2, Eq. (9)).

Boundaries are noise levels (sigma, after the shift), so every phase ends exactly on a boundary: expert k
must land on samples of p(x_{t_k}). Inside a phase the steps are uniform in unshifted time and then
shifted, which is how SD3/Wan/Qwen schedulers space their steps.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from numbers import Real
from pathlib import Path

import yaml

from pdmd import limits
from pdmd.core.rectified_flow import shift_time, unshift_time


class ScheduleError(ValueError):
    """An invalid phase schedule; the message names the offending value and the rule it breaks."""


def _number(value, what: str) -> float:
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            raise ScheduleError(f"{what} {value.strip()!r} is not a number") from None
    if isinstance(value, bool) or not isinstance(value, Real):
        raise ScheduleError(f"{what} {value!r} is not a number")
    value = float(value)
    if not math.isfinite(value):
        raise ScheduleError(f"{what} {value} must be a finite number")
    return value


def _step_count(value, phase: int) -> int:
    number = _number(value, f"steps of phase {phase}")
    if number != int(number):
        raise ScheduleError(f"steps of phase {phase} = {value!r} must be a whole number")
    if number < 1:
        raise ScheduleError(f"steps of phase {phase} = {int(number)} must be at least 1")
    return int(number)


def _split(text: str) -> list[str]:
    return [part for part in text.replace(";", ",").replace(" ", ",").split(",") if part.strip()]


@dataclass(frozen=True)
class PhaseSchedule:
    """Interior boundaries (strictly decreasing, in (0, 1)), Euler steps per phase, and a timestep shift.

    ``steps`` may be one int for every phase; ``boundaries`` and ``steps`` may be comma-separated strings.
    Construction validates everything and raises :class:`ScheduleError`.
    """

    boundaries: tuple[float, ...] = ()
    steps: tuple[int, ...] = (1,)
    shift: float = 1.0

    def __post_init__(self):
        raw_bounds = _split(self.boundaries) if isinstance(self.boundaries, str) else self.boundaries
        try:
            raw_bounds = list(raw_bounds)
        except TypeError:
            raise ScheduleError(f"boundaries {self.boundaries!r} must be a list of numbers") from None
        bounds = tuple(_number(b, "boundary") for b in raw_bounds)
        for b in bounds:
            if not 0 < b < 1:
                raise ScheduleError(f"boundary {b} must lie strictly between 0 and 1")
        for prev, b in zip(bounds, bounds[1:]):
            if b == prev:
                raise ScheduleError(f"boundary {b} appears twice; boundaries must be distinct")
            if b > prev:
                raise ScheduleError(
                    f"boundary {b} follows {prev}; boundaries must be strictly decreasing (high noise first)")

        steps = self.steps
        if isinstance(steps, str):
            steps = _split(steps)
            if len(steps) == 1:
                steps = steps[0]
        if isinstance(steps, (str, Real)):
            steps = [steps] * (len(bounds) + 1)
        steps = list(steps)
        if not steps:
            raise ScheduleError("steps is empty: a schedule needs at least one phase")
        if len(steps) != len(bounds) + 1:
            raise ScheduleError(f"steps {steps} lists {len(steps)} phases but {len(bounds)} boundaries "
                                f"make {len(bounds) + 1}; give one step count per phase")
        steps = tuple(_step_count(n, k + 1) for k, n in enumerate(steps))

        shift = _number(self.shift, "shift")
        if not limits.MIN_SHIFT <= shift <= limits.MAX_SHIFT:  # beyond these the grid collapses onto 0 or 1
            raise ScheduleError(f"shift {shift:g} must lie between {limits.MIN_SHIFT:g} and {limits.MAX_SHIFT:g}")
        if sum(steps) > limits.MAX_SCHEDULE_STEPS:
            raise ScheduleError(f"{sum(steps)} steps in all; a schedule has at most {limits.MAX_SCHEDULE_STEPS}")

        object.__setattr__(self, "boundaries", bounds)
        object.__setattr__(self, "steps", steps)
        object.__setattr__(self, "shift", shift)

    # --- construction -------------------------------------------------------------------------------
    @classmethod
    def uniform(cls, steps: int, shift: float = 1.0) -> "PhaseSchedule":
        """A plain N-step sampler: one phase."""
        return cls((), (steps,), shift)

    @classmethod
    def parse(cls, boundaries: str, steps="1", shift="1") -> "PhaseSchedule":
        """From text as typed in a form: boundaries "0.875" or "0.9, 0.6", steps "2" or "2, 2"."""
        return cls(boundaries, steps, shift)

    @classmethod
    def from_dict(cls, data) -> "PhaseSchedule":
        """From a mapping with keys boundaries, steps, shift (or a ``preset`` name plus overrides)."""
        if not isinstance(data, dict):
            raise ScheduleError(f"schedule {data!r} must be a mapping with boundaries, steps and shift")
        data = dict(data)
        unknown = set(data) - {"boundaries", "steps", "shift", "preset"}
        if unknown:
            raise ScheduleError(f"unknown schedule key(s) {sorted(unknown)}; "
                                "allowed: boundaries, steps, shift, preset")
        base = preset(data.pop("preset")).as_dict() if "preset" in data else {}
        base.update(data)
        bounds = base.get("boundaries", ())
        if isinstance(bounds, Real) and not isinstance(bounds, bool):
            bounds = (bounds,)
        return cls(bounds, base.get("steps", 1), base.get("shift", 1.0))

    @classmethod
    def from_yaml(cls, source) -> "PhaseSchedule":
        """From a YAML file path or YAML text; a top-level ``schedule:`` section is used when present."""
        text = Path(source).read_text() if isinstance(source, Path) or (
            isinstance(source, str) and "\n" not in source and Path(source).is_file()) else source
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as err:
            raise ScheduleError(f"schedule YAML does not parse: {err}") from None
        if isinstance(data, dict) and "schedule" in data:
            data = data["schedule"]
        return cls.from_dict(data)

    def as_dict(self) -> dict:
        return {"boundaries": list(self.boundaries), "steps": list(self.steps), "shift": self.shift}

    # --- derived quantities -------------------------------------------------------------------------
    @property
    def num_phases(self) -> int:
        return len(self.steps)

    @property
    def edges(self) -> tuple[float, ...]:
        """t_0 = 1, the interior boundaries, t_K = 0."""
        return (1.0, *self.boundaries, 0.0)

    @property
    def nfe(self) -> int:
        """Model evaluations per sample without CFG (one per Euler step); CFG doubles it."""
        return sum(self.steps)

    @property
    def timesteps(self) -> tuple[float, ...]:
        """All nfe + 1 timesteps from 1 down to 0; phase boundaries are among them."""
        ts = [1.0]
        for (start, end), n in zip(zip(self.edges, self.edges[1:]), self.steps):
            u_start, u_end = unshift_time(start, self.shift), unshift_time(end, self.shift)
            ts += [shift_time(u_start + (u_end - u_start) * (i + 1) / n, self.shift) for i in range(n - 1)]
            ts.append(end)  # exactly on the boundary, not a rounding error away from it
        return tuple(ts)

    @property
    def phase_of_step(self) -> tuple[int, ...]:
        """0-based phase index of every Euler step."""
        return tuple(k for k, n in enumerate(self.steps) for _ in range(n))

    @property
    def boundary_step_indices(self) -> tuple[int, ...]:
        """Index into ``timesteps`` of each phase's end t_1 .. t_K (the last is the final sample)."""
        ends, total = [], 0
        for n in self.steps:
            total += n
            ends.append(total)
        return tuple(ends)

    @property
    def boundary_log_snr(self) -> tuple[float, ...]:
        """log SNR = log(alpha_t^2 / sigma_t^2) at every interior boundary (docs/method.md Eq. (10))."""
        return tuple(2 * math.log((1 - t) / t) for t in self.boundaries)

    def phase_at(self, t: float) -> int:
        """0-based phase of a step starting at t: phase k owns t_k >= t > t_{k+1} (a boundary opens a phase)."""
        return sum(t <= b for b in self.boundaries)

    def describe(self) -> str:
        bounds = ", ".join(f"{b:g}" for b in self.boundaries) or "none"
        return (f"{self.num_phases} phase(s), boundaries {bounds}, steps {list(self.steps)}, "
                f"shift {self.shift:g}, NFE {self.nfe}")


PRESETS: dict[str, PhaseSchedule] = {
    # the paper's few-step student: 4 steps in 2 phases
    "paper-2x2": PhaseSchedule((0.5,), (2, 2), 1.0),
    # Wan2.2-Lightning T2V: 2 + 2 steps, shift 5, one phase per Wan 2.2 A14B expert. The experts switch at
    # sigma 0.875 and a step starting exactly there runs on the high-noise one (as in diffusers), so the
    # boundary sits just below it: phase 2 then runs wholly on the low-noise expert
    "wan2.2-lightning": PhaseSchedule((0.87,), (2, 2), 5.0),
    # one Euler step per phase: each expert is a one-step generator for its subinterval
    "one-step-per-phase": PhaseSchedule((0.75, 0.5, 0.25), (1, 1, 1, 1), 1.0),
}


def preset(name: str) -> PhaseSchedule:
    try:
        return PRESETS[name]
    except KeyError:
        raise ScheduleError(f"unknown schedule preset {name!r}; known: {', '.join(PRESETS)}") from None
