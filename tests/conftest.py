"""Shared fixtures. ``tiny_pipeline(family)``: the folder of a tiny diffusers pipeline (tests/tiny_pipelines.py),
built once per test session."""
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_pipeline(tmp_path_factory):
    import tiny_pipelines

    built = {}

    def get(family: str) -> Path:
        if family not in built:
            built[family] = tiny_pipelines.build(family, tmp_path_factory.mktemp(family.replace(".", "")))
        return built[family]
    return get
