"""Teachers: every flow-matching model the trainer and the app can distil or sample, behind one interface."""
from __future__ import annotations

from pdmd.teachers.base import Teacher

__all__ = ["Teacher", "load_teacher", "TEACHERS"]

TEACHERS = ("builtin",)


def load_teacher(name: str, device=None) -> Teacher:
    """A teacher by id: ``builtin`` is the tiny model shipped in assets/."""
    if name == "builtin":
        from pdmd.teachers.builtin import load_builtin_teacher
        return load_builtin_teacher(device=device)
    raise ValueError(f"unknown teacher {name!r}; available: {', '.join(TEACHERS)}")
