"""Shared fixtures. ``tiny_pipeline(family)``: the folder of a tiny diffusers pipeline (pdmd/teachers/tiny.py),
built once per test run -- under pytest-xdist, once for all workers (``built_once``).

The suite runs on every core (pytest.ini: ``-n auto``), one worker per core, so each worker's torch and every
process a test starts get one thread: oversubscribed torch threads were measured 100x slower
(docs/benchmarks.md). Set before anything imports torch.
"""
import os

if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"

from pathlib import Path  # noqa: E402  (after the thread count, which must precede torch)

import pytest  # noqa: E402
from filelock import FileLock  # noqa: E402  (huggingface_hub's dependency)


@pytest.fixture(scope="session")
def built_once(tmp_path_factory, worker_id):
    """``built_once(name, build)``: the folder ``build(folder)`` fills, made by whichever worker asks first and
    shared by the others (pytest-xdist's documented pattern: a lock in the run's common temporary folder)."""
    shared = tmp_path_factory.getbasetemp() if worker_id == "master" else tmp_path_factory.getbasetemp().parent

    def get(name: str, build) -> Path:
        folder = shared / f"built-{name}"
        with FileLock(str(folder) + ".lock"):
            if not (folder / ".done").exists():
                folder.mkdir(exist_ok=True)
                build(folder)
                (folder / ".done").touch()
        return folder
    return get


@pytest.fixture(scope="session")
def tiny_pipeline(built_once):
    from pdmd.teachers import tiny

    def get(family: str) -> Path:
        return built_once(f"tiny-{family.replace('.', '')}", lambda folder: tiny.build(family, folder))
    return get


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook, which reads the groups into the test ids
def pytest_collection_modifyitems(items):
    """Under ``--dist loadgroup``, the tests of a module that share a module-scoped fixture (an app server, a
    loaded teacher) go to one worker, so the fixture is built once; every other test is balanced freely."""
    for item in items:
        definitions = getattr(item, "_fixtureinfo", None)
        if definitions and any(d.scope == "module" for defs in definitions.name2fixturedefs.values() for d in defs):
            item.add_marker(pytest.mark.xdist_group(item.module.__name__))
