"""Shared fixtures. ``tiny_pipeline(family)``: the folder of a tiny diffusers pipeline (pdmd/teachers/tiny.py),
built once per test session."""
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_pipeline(tmp_path_factory):
    from pdmd.teachers import tiny

    built = {}

    def get(family: str) -> Path:
        if family not in built:
            built[family] = tiny.build(family, tmp_path_factory.mktemp(family.replace(".", "")))
        return built[family]
    return get
