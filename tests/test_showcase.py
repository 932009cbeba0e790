"""The showcase file and the Showcase tab's handlers (the API): exactly the owner's pairs, nothing else; ZeroGPU
wraps exactly the GPU calls. Models: examples/build_showcase.py's tiny SD3 and Wan 2.2 pipelines and students."""
from __future__ import annotations

import importlib
import shutil
import sys
import types
from pathlib import Path

import pytest
import yaml

from pdmd.core.schedule import PRESETS
from pdmd.paths import SHIPPED_STUDENTS
from pdmd.showcase import Showcase, ShowcaseError

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))


@pytest.fixture(scope="session")
def showcase_file(built_once) -> Path:
    """examples/showcase.yaml next to freshly built tiny models (shared with the browser test and every worker)."""
    import build_showcase

    def build(where: Path) -> None:
        build_showcase.build(where / "showcase-models")
        shutil.copy(ROOT / "examples" / "showcase.yaml", where / "showcase.yaml")
    return built_once("showcase", build) / "showcase.yaml"


@pytest.fixture(autouse=True)
def runs(tmp_path, monkeypatch):
    monkeypatch.setenv("PDMD_RUNS_DIR", str(tmp_path / "runs"))
    return tmp_path / "runs"


def variant(showcase_file: Path, tmp_path: Path, change) -> Path:
    data = yaml.safe_load(showcase_file.read_text())
    change(data)
    path = showcase_file.parent / f"variant-{tmp_path.name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def wan(data) -> dict:
    return data["teachers"][1]


BAD_FILES = {
    "missing folder": (lambda d: wan(d)["students"][0].update(folder="showcase-models/nowhere"),
                       "teachers[tiny-wan22].students[phased].folder: not a usable student folder"),
    "strength above 2": (lambda d: wan(d)["students"][1].update(strengths=[2.5, 1.0]),
                         "teachers[tiny-wan22].students[lightning-style].strengths: 2.5 is outside [0, 2]"),
    "a file per phase": (lambda d: wan(d)["students"][1].update(boundaries=[], steps=[4]),
                         "students[lightning-style].lora: 2 file(s) for 1 phase(s)"),
    "unknown key": (lambda d: d["teachers"][0].update(colour="red"), "teachers[0]: unknown key(s) ['colour']"),
    "open names no pair": (lambda d: d.update(open="tiny-sd3/nothing"), "open: 'tiny-sd3/nothing' names no pair"),
    "quantize": (lambda d: d["teachers"][0].update(quantize="int3"),
                     "teachers[tiny-sd3].quantize: 'int3' must be one of none, int8, fp8, nf4"),
    "nf4 on the CPU": (lambda d: d["teachers"][0].update(quantize="nf4"),
                       "teachers[tiny-sd3].quantize: quantize = nf4 needs bitsandbytes and a CUDA GPU"),
    "student of another teacher": (lambda d: d["teachers"][0]["students"][0].update(
        folder="showcase-models/wan22-run/student"), "is a student of"),
}


@pytest.mark.parametrize("case", BAD_FILES)
def test_an_invalid_file_is_one_line_naming_the_entry_and_the_rule(showcase_file, tmp_path, case):
    change, message = BAD_FILES[case]
    with pytest.raises(ShowcaseError) as error:
        Showcase.read(variant(showcase_file, tmp_path, change))
    assert message in str(error.value) and "\n" not in str(error.value)


def test_the_example_file_lists_its_pairs(showcase_file):
    showcase = Showcase.read(showcase_file)
    assert showcase.pairs() == ["tiny-sd3/phased", "tiny-wan22/phased", "tiny-wan22/lightning-style",
                              "tiny-zimage-style/phased"]
    assert showcase.opening == ("tiny-sd3", "phased") and not showcase.eager


@pytest.fixture
def store(showcase_file):
    from ui.showcase import ShowcaseStore
    return ShowcaseStore(Showcase.read(showcase_file))


def test_the_handlers_refuse_every_other_teacher_folder_and_hub_id(store, showcase_file):
    from pdmd.teachers.base import TeacherError
    from ui.showcase import on_student

    tried = ["Qwen/Qwen-Image", "builtin", str(showcase_file.parent / "showcase-models" / "sd3"),
             str(SHIPPED_STUDENTS / "phased"), "tiny-sd3/../../etc", "tiny-sd3", {"name": "builtin"}]
    for value in tried:
        status, run = on_student(store, value, "a red cat", 0, 1.0, 1.0)[3:]
        assert "is not offered here" in status and run is None
        assert str(showcase_file.parent) not in status  # no server path echoed
    for name in ("builtin", "Qwen/Qwen-Image", str(ROOT)):  # and the store below the handlers
        with pytest.raises(TeacherError, match="only its showcase's teachers"):
            store.loaded_teacher(name)
    with pytest.raises(ValueError, match="only its showcase's students"):
        store.student(SHIPPED_STUDENTS / "phased")


def test_the_style_pair_serves_its_base_with_the_owners_style_lora_on_both_sides(store):
    from ui.showcase import on_status, on_student, on_teacher

    on_status(store, "tiny-zimage-style/phased")
    _, _, caption, _, run = on_student(store, "tiny-zimage-style/phased", "two blue dogs", 5)
    assert "NFE 4" in caption and run["seed"] == 5
    teacher, _ = store.showcase.pair("tiny-zimage-style/phased")
    (style,) = store.teacher(teacher.model).style_loras  # the student's experts stand on base + style
    assert style.strength == 0.8 and style.file.name == "pytorch_lora_weights.safetensors"
    _, _, teacher_caption, _, summary, done = on_teacher(store, run, 8, 1.0)
    assert "NFE 8" in teacher_caption and done == "Done."  # cfg 1: Z-Image's one evaluation a step


def test_both_pairs_compare_with_video_for_wan_and_a_slider_for_images(store):
    from ui.showcase import on_status, on_student, on_teacher

    assert "Loading **tiny-sd3**" in on_status(store, "tiny-sd3/phased")  # lazy: the first request loads
    for pair, video in (("tiny-sd3/phased", False), ("tiny-wan22/lightning-style", True)):
        student_video, _, caption, _, run = on_student(store, pair, "a red cat", 3, 0.5, 1.5)
        assert "NFE 4" in caption and "seed 3" in caption and run["seed"] == 3
        teacher_video, _, teacher_caption, slider, summary, done = on_teacher(store, run, 8, 4.0)
        assert "NFE 16" in teacher_caption and "faster" in summary and done == "Done."
        assert teacher_video["visible"] == student_video["visible"] == video
        if video:
            assert teacher_video["value"].endswith(".mp4") and student_video["value"].endswith(".mp4")
        assert slider["visible"] == (not video)
    assert on_status(store, "tiny-sd3/phased") == "Running the student…"


def test_bad_requests_get_a_message_and_the_app_keeps_serving(store, showcase_file, tmp_path):
    from ui.showcase import on_student

    assert "strength 2.5 must lie between 0 and 2" in on_student(store, "tiny-wan22/lightning-style", "x", 0, 2.5, 1)[3]
    assert "prompt is empty" in on_student(store, "tiny-sd3/phased", " ", 0)[3]
    # a LoRA file made for another teacher: refused when the pair first loads
    data = yaml.safe_load(showcase_file.read_text())
    data["teachers"][0]["students"].append({"name": "misfit", "lora": wan(data)["students"][1]["lora"],
                                            "boundaries": [0.8], "steps": [2, 2]})
    (showcase_file.parent / "misfit.yaml").write_text(yaml.safe_dump(data))
    from ui.showcase import ShowcaseStore
    misfit = ShowcaseStore(Showcase.read(showcase_file.parent / "misfit.yaml"))
    status = on_student(misfit, "tiny-sd3/misfit", "a red cat", 0, 1.0, 1.0)[3]
    assert "Refused" in status and "SD3 LoRAs" in status  # a Wan LoRA does not fit SD3
    assert "NFE 4" in on_student(misfit, "tiny-sd3/phased", "a red cat", 0)[2]  # still serving


def test_a_quantized_teacher_loads_int8_and_serves_both_sides(showcase_file, tmp_path):
    import torch

    from ui.showcase import ShowcaseStore, on_student, on_teacher

    showcase = Showcase.read(variant(showcase_file, tmp_path, lambda d: d["teachers"][0].update(quantize="int8")))
    assert showcase.teachers[0].options["quantize"] == "int8" and "quantize" not in showcase.teachers[1].options
    store = ShowcaseStore(showcase)
    _, _, caption, status, run = on_student(store, "tiny-sd3/phased", "a red cat", 3)
    assert "NFE 4" in caption, status
    network = store.teacher(showcase.teachers[0].model).model  # load_teacher(..., quantize="int8"), on the CPU
    weights = [layer.weight for layer in network.modules() if isinstance(layer, torch.nn.Linear)]
    assert weights and all(type(w).__name__ == "Int8Tensor" for w in weights)
    assert "NFE 16" in on_teacher(store, run, 8, 4.0)[2]


# --- ZeroGPU ---------------------------------------------------------------------------------------------------
@pytest.fixture
def zero_gpu(monkeypatch):
    """A fake ``spaces`` on ZeroGPU hardware: records each spaces.GPU call and the duration it asks."""
    calls = []

    def gpu(duration):
        def declare(function):
            def on_gpu(*args, **kwargs):
                calls.append((args[0].__name__, duration(*args, **kwargs)))
                return function(*args, **kwargs)
            return on_gpu
        return declare

    fake = types.SimpleNamespace(GPU=gpu, config=types.SimpleNamespace(Config=types.SimpleNamespace(zero_gpu=True)))
    monkeypatch.setitem(sys.modules, "spaces", fake)
    import ui.gpu
    importlib.reload(ui.gpu)
    yield calls
    monkeypatch.delitem(sys.modules, "spaces")
    importlib.reload(ui.gpu)


def test_without_spaces_nothing_is_wrapped():
    import ui.gpu
    assert not ui.gpu.on_zero_gpu() and ui.gpu._ON_GPU is None


def test_on_zero_gpu_exactly_the_sampling_calls_run_in_spaces_gpu(zero_gpu, store):
    from ui import compare, students
    from ui.models import ModelStore
    from ui.showcase import on_pick, on_status, on_student, on_teacher

    builtin = ModelStore()
    schedule = PRESETS["paper-2x2"].as_dict()
    compare.describe_student(builtin, students.BASELINE, "as trained", schedule)
    builtin.teacher()  # loading is no GPU call
    assert zero_gpu == []
    run = compare.on_compare_student(builtin, "a red star on a dark background", 0, False, students.BASELINE,
                                     "as trained", schedule, 3.0)[5]
    compare.on_compare_teacher(builtin, run, 32, 3.0, progress=lambda *a, **k: None)
    compare.on_diversity(builtin, "a red star on a dark background", 0, 2, students.BASELINE, "as trained", schedule,
                         8, 3.0, progress=lambda *a, **k: None)
    assert [name for name, _ in zero_gpu] == ["_sample_side"] * 4  # student, teacher, the seed grid's two sides
    (_, student_s), (_, teacher_s) = zero_gpu[:2]
    assert student_s < teacher_s  # a few-step student asks for less GPU time: queue priority
    zero_gpu.clear()
    on_pick(store.showcase, 2, "tiny-wan22/lightning-style")
    on_status(store, "tiny-wan22/lightning-style")
    assert zero_gpu == []
    on_teacher(store, on_student(store, "tiny-wan22/lightning-style", "a cat", 0, 1, 1)[4], 8, 4.0)
    assert [name for name, _ in zero_gpu] == ["_sample_side"] * 2
