"""The app on a ZeroGPU Space, without one: every GPU call crosses a pickle boundary (tests/zero_gpu_standin, a
``spaces`` stand-in that round-trips arguments and results as the real worker queue does), asks for GPU time that
counts every network evaluation, and finds its models in the store; switching models frees the old one before the
next loads; models go on the GPU where there is one.

The real ``spaces`` package is not used: its ZeroGPU path cannot run on a CPU machine (it fails at import on a CPU
build of torch, reading torch.version.cuda, and its worker initialises CUDA and asks the Space's device API for a
GPU), and off ZeroGPU its GPU decorator returns the function unchanged."""
from __future__ import annotations

import contextlib
import importlib
import json
import os
import subprocess
import sys
import threading
import weakref
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from test_app_browser import free_port, wait_until_serving
from test_showcase import showcase_file  # noqa: F401  (fixture: the example showcase on tiny pipelines, built once)

from pdmd.core.schedule import PRESETS, PhaseSchedule
from pdmd.paths import SHIPPED_STUDENTS
from pdmd.students.folder import Student
from pdmd.teachers.base import Teacher
from ui import compare, comparison, gpu, models, students
from ui.models import ModelStore

ROOT = Path(__file__).resolve().parents[1]
STANDIN = Path(__file__).resolve().parent / "zero_gpu_standin"
PROMPT = "a red star on a dark background"
PAPER = PRESETS["paper-2x2"].as_dict()


@pytest.fixture(autouse=True)
def runs(tmp_path, monkeypatch):
    monkeypatch.setenv("PDMD_RUNS_DIR", str(tmp_path / "runs"))
    return tmp_path / "runs"


@pytest.fixture
def zero_gpu(monkeypatch):
    """The app's process on a ZeroGPU Space: ``spaces`` is the pickling stand-in; yields its call record."""
    monkeypatch.syspath_prepend(str(STANDIN))
    monkeypatch.delitem(sys.modules, "spaces", raising=False)
    import spaces
    assert Path(spaces.__file__).parent == STANDIN
    importlib.reload(gpu)
    spaces.calls.clear()
    yield spaces.calls
    monkeypatch.undo()
    sys.modules.pop("spaces", None)
    importlib.reload(gpu)


@pytest.fixture(scope="module")
def store():
    return ModelStore()


# --- the stand-in refuses what a worker cannot receive ---------------------------------------------------------
def test_the_standin_refuses_what_cannot_cross_into_a_worker(zero_gpu):
    import pickle

    import spaces
    for value in (threading.Lock(), lambda: None, torch.nn.Linear(2, 2)):
        with pytest.raises((pickle.PicklingError, TypeError, AttributeError)):
            spaces.across(value)
    picture = spaces.across({"pictures": torch.ones(1, 3, 2, 2), "nfe": 4})
    assert picture["nfe"] == 4 and picture["pictures"].sum() == 12


# --- Compare's calls cross the boundary, ask for their evaluations, lose only their live progress ---------------
def test_compare_runs_every_sample_through_the_worker_boundary(zero_gpu, store):
    phased = str(SHIPPED_STUDENTS / "phased")
    progress = []
    out = compare.on_compare_student(store, PROMPT, 3, False, phased, comparison.AS_TRAINED, PAPER, 3.0,
                                     teacher_phases=["phase 2"])
    caption, run = out[2], out[5]
    assert "phase 2 by the teacher" in caption and run["seed"] == 3, out[4]
    teacher = compare.on_compare_teacher(store, run, 8, 3.0, progress=lambda *a, **k: progress.append(a))
    assert "NFE 16" in teacher[2] and teacher[-1] == "Done."
    assert run["states"] and teacher[4].width > 0  # boundary states came back as images, the strip was drawn
    grid = compare.on_diversity(store, PROMPT, 0, 2, students.BASELINE, comparison.AS_TRAINED, PAPER, 4, 3.0,
                                progress=lambda *a, **k: progress.append(a))
    assert "Diversity" in grid[2]
    assert [name for name, _ in zero_gpu] == ["_sample_side"] * 4
    assert progress == []  # no callback reaches a worker: live progress is dropped on ZeroGPU


def test_off_zero_gpu_the_teacher_reports_live_progress(store):
    assert not gpu.on_zero_gpu()
    run = compare.on_compare_student(store, PROMPT, 0, False, students.BASELINE, comparison.AS_TRAINED, PAPER, 1.0)[5]
    progress = []
    compare.on_compare_teacher(store, run, 4, 1.0, progress=lambda share, desc: progress.append(desc))
    assert progress == [f"teacher step {k}/4" for k in range(1, 5)]


def test_gpu_seconds_count_the_evaluations_cfg_doubles(zero_gpu, store):
    assert gpu.evaluations((16, 16), (1.0, 1.0), guidance_input=False) == 32
    assert gpu.evaluations((16, 16), (5.0, 5.0), guidance_input=False) == 64  # cond and uncond per step
    assert gpu.evaluations((16, 16), (5.0, 5.0), guidance_input=True) == 32   # FLUX.1-dev: guidance is an input
    assert gpu.evaluations((1, 16), (1.0, 5.0), guidance_input=False) == 33   # a student's phase 2 by the teacher
    eight = PhaseSchedule.uniform(8, 1.0)
    for cfg, nfe in ((5.0, 16), (1.0, 8)):
        (row,) = comparison.sample_side(comparison.teacher_side(store, "builtin", None, eight, cfg), [([PROMPT], 0)])
        assert row.nfe == nfe  # what the sampler counted is what was asked for
        assert zero_gpu[-1] == ("_sample_side", gpu.gpu_seconds(nfe, 1, video=False))
    two = comparison.teacher_side(store, "builtin", None, eight, 5.0)
    comparison.sample_side(two, [([PROMPT, PROMPT], 0), ([PROMPT], 1)])
    assert zero_gpu[-1][1] == gpu.gpu_seconds(16, 3, video=False)  # every image of every row


# --- the showcase and Compare of a public Space, through its API ------------------------------------------------
@contextlib.contextmanager
def zero_gpu_space(runs: Path, showcase: Path, log: Path):
    """``python app.py`` as on a ZeroGPU Space (SPACE_ID, the pickling ``spaces``) with a showcase and, training
    opened, Compare beside it; the URL."""
    port = free_port()
    path = os.pathsep.join(p for p in (str(STANDIN), os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "PDMD_RUNS_DIR": str(runs), "PDMD_SHOWCASE": str(showcase), "SPACE_ID": "pdmd/zero-gpu",
           "PDMD_TRAINING": "on", "PYTHONPATH": path, "SPACES_STANDIN_LOG": str(log), "OMP_NUM_THREADS": "1",
           "GRADIO_ANALYTICS_ENABLED": "False"}
    runs.mkdir(parents=True, exist_ok=True)
    with (runs / "app.log").open("w") as out:
        server = subprocess.Popen([sys.executable, "app.py", "--port", str(port)], cwd=ROOT, env=env, stdout=out,
                                  stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    try:
        wait_until_serving(url, server, runs / "app.log")
        yield url
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_compare_and_showcase_on_a_zero_gpu_space_through_the_api(showcase_file, tmp_path):  # noqa: F811
    from gradio_client import Client

    log = tmp_path / "gpu-calls.jsonl"
    with zero_gpu_space(tmp_path / "space-runs", showcase_file, log) as url:
        client = Client(url, verbose=False)
        student = client.predict(PROMPT, 3, False, str(SHIPPED_STUDENTS / "phased"), comparison.AS_TRAINED, 3.0,
                                 [], api_name="/compare_student")
        assert "NFE 4" in student[2], student
        teacher = client.predict(8, 3.0, api_name="/compare_teacher")
        assert "NFE 16" in teacher[2] and teacher[-1] == "Done.", teacher
        student = client.predict("tiny-wan22/lightning-style", "a green tree", 3, 0.5, 1.0,
                                 api_name="/showcase_student")
        assert "NFE 4" in student[2], student
        teacher = client.predict(6, 4.0, api_name="/showcase_teacher")
        assert "NFE 12" in teacher[2] and teacher[-1] == "Done." and teacher[0]["value"].endswith(".mp4"), teacher
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    assert [c["function"] for c in calls] == ["_sample_side"] * 4  # each through the pickling spaces.GPU
    video_teacher = calls[-1]["seconds"]
    assert video_teacher == gpu.gpu_seconds(12, 1, video=True)  # 6 steps at CFG 4: two evaluations each


# --- switching models: the old one is gone before the next loads -------------------------------------------------
class BigTeacher(Teacher):
    """A CPU stand-in for a pipeline: a network and a reference cycle (as diffusers' modules have), so only a
    collection frees it once the last reference is dropped."""
    default_steps, default_cfg, default_shift = 4, 1.0, 1.0

    def __init__(self, name: str):
        self.name, self.model = name, torch.nn.Linear(4, 4)
        self.model.owner = self

    def encode_prompts(self, prompts):
        return None, None

    def velocity(self, x, t, cond):
        return x

    @property
    def latent_shape(self):
        return (4,)

    def decode(self, latents):
        return latents


def test_a_switch_frees_the_old_big_teacher_before_the_next_loads(monkeypatch, tmp_path):
    monkeypatch.setattr(models, "COPY_BELOW_BYTES", 0)  # every teacher counts as big
    networks, alive_at_load = {}, []

    def load_teacher(name, **options):
        alive_at_load.append({loaded for loaded, network in networks.items() if network() is not None})
        teacher = BigTeacher(name)
        networks[f"{name} #{len(alive_at_load)}"] = weakref.ref(teacher.model)
        return teacher

    monkeypatch.setattr(models, "load_teacher", load_teacher)
    monkeypatch.setattr(models, "load_student", lambda folder, teacher, manifest: Student(
        folder, manifest, SimpleNamespace(teacher=teacher)))
    store = ModelStore()
    monkeypatch.setattr(store, "manifest", lambda folder: SimpleNamespace(teacher="big-b",
                                                                          teacher_load_options=lambda folder: {}))
    store.teacher("big-a")
    store.teacher("big-b")  # another teacher: big-a dropped
    assert alive_at_load[-1] == set()
    store.student(tmp_path / "first")  # shares big-b's network
    store.student(tmp_path / "second")  # another student of it: big-b (carrying the first) loaded afresh
    assert alive_at_load[-1] == set() and len(alive_at_load) == 3
    assert store.loaded_teachers() == ["big-b"]


def test_a_worker_forked_while_a_model_loads_finds_the_store_unlocked(store):
    held, release = threading.Event(), threading.Event()

    def load():
        with store._loading:  # a visitor's model loading in the app's process ...
            held.set()
            release.wait()

    loader = threading.Thread(target=load)
    loader.start()
    held.wait()
    try:
        child = os.fork()  # ... while another visitor's spaces.GPU call forks its worker
        if child == 0:
            os._exit(0 if store._loading.acquire(timeout=5) else 1)
        _, status = os.waitpid(child, 0)
    finally:
        release.set()
        loader.join()
    assert os.waitstatus_to_exitcode(status) == 0


# --- where models go ---------------------------------------------------------------------------------------------
def test_models_load_on_the_gpu_when_there_is_one(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert models.placement() == {"device": "cuda"} and models.sampling_device() == "cuda"
    asked = []
    monkeypatch.setattr(models, "load_teacher", lambda name, **options: asked.append(options) or BigTeacher(name))
    ModelStore().teacher("builtin")
    assert asked == [{"device": "cuda"}]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert models.placement() == {"device": "cpu"} and models.sampling_device() == "cpu"


def test_on_zero_gpu_models_stay_in_ram_until_a_call_moves_them(zero_gpu, monkeypatch, tiny_pipeline):
    from pdmd.teachers import load_teacher

    teacher = load_teacher(str(tiny_pipeline("sd3")), offload=True, height=16, width=16)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # as ``spaces`` makes it in the app's process
    assert models.placement() == {"device": "cpu", "dtype": "bf16"}
    models.to_device(teacher, "meta")  # what a call does with "cuda"; the meta device moves without a GPU
    assert teacher.device.type == "meta"
    assert {next(m.parameters()).device.type for m in (*teacher.text_encoders, teacher.pipe.vae)} == {"cpu"}
