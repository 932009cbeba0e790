"""Teachers: every flow-matching model the trainer and the app can distil or sample, behind one interface."""
from pdmd.teachers.base import Teacher

__all__ = ["Teacher"]
