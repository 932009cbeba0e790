"""The app's image input for a conditioned teacher (the tiny Wan 2.1 I2V): Compare samples both sides on the
uploaded image, prompt and seed; rows with different images share a batch and each equals its request alone, also
across the ZeroGPU pickle boundary; a teacher that needs an image and has none, or a text-only teacher sent one,
is refused in one line; bad files sent through the API (gradio_client against a served app) are refused in one
line naming the file and the problem, before anything decodes them, and leave nothing behind; the Showcase takes
example images."""
from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_zero_gpu import zero_gpu  # noqa: F401  (fixture: the pickling spaces stand-in)

from pdmd.conditions import open_image
from pdmd.core.schedule import PhaseSchedule
from pdmd.showcase import Showcase, ShowcaseError
from pdmd.teachers import BUILTIN
from ui import compare, comparison, students, teacher_picker
from ui.comparison import Row
from ui.models import ModelStore

SIZE = (16, 32, 5)  # height, width, frames: latents (16, 2, 2, 4), as tests/test_wan21_i2v.py
PROMPT = "a red cat on a sofa"
TWO_STEPS = PhaseSchedule((0.5,), (1, 1), 5.0).as_dict()  # the baseline's schedule: one boundary, two steps


@pytest.fixture(autouse=True)
def runs(tmp_path, monkeypatch):
    monkeypatch.setenv("PDMD_RUNS_DIR", str(tmp_path / "runs"))
    return tmp_path / "runs"


@pytest.fixture(scope="module")
def folder(tiny_pipeline) -> Path:
    return tiny_pipeline("wan2.1-i2v")


@pytest.fixture(scope="module")
def store():
    return ModelStore()


@pytest.fixture(scope="module")
def i2v(store, folder):
    """The tiny Wan 2.1 I2V loaded through Compare's teacher box: (teacher state, the image input's update)."""
    state, status, *_, image_box = teacher_picker.on_load_teacher(store, BUILTIN, str(folder), *SIZE)
    assert "✓" in status and "samples from an image" in status, status
    return state, image_box


def picture_file(folder: Path, name: str, seed: int) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (SIZE[0], SIZE[1], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(folder / name)
    return str(folder / name)


@pytest.fixture(scope="module")
def uploads(tmp_path_factory) -> list[str]:
    """Two images as gradio keeps uploads: each in a folder of its own under its sent name."""
    root = tmp_path_factory.mktemp("gradio-cache")
    return [picture_file(root / "a", "first.png", 0), picture_file(root / "b", "second.png", 1)]


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def bad_files(folder: Path) -> dict[str, tuple[Path, str]]:
    """Each bad file and the problem its refusal names."""
    folder.mkdir(parents=True, exist_ok=True)
    text = folder / "notes.png"
    text.write_text("a shopping list, not an image\n")
    # a PNG that claims 20000x20000 pixels (1.2 GB decoded) in a few dozen bytes: signature, IHDR, an empty IDAT
    huge = folder / "huge.png"
    huge.write_bytes(b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", struct.pack(">IIBBBBB", 20000, 20000, 8, 2, 0, 0, 0))
                     + png_chunk(b"IDAT", b""))
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(2).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buffer, "JPEG")
    cut = folder / "cut.jpg"
    cut.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    return {"text": (text, "notes.png: not an image this program reads"),
            "huge": (huge, "huge.png: more pixels than the 16,777,216 an image may have"),
            "truncated": (cut, "cut.jpg: the image data is damaged or cut short")}


def compare_student(store, state, image=None, seed=3):
    return compare.on_compare_student(store, PROMPT, seed, False, students.BASELINE, comparison.AS_TRAINED,
                                      TWO_STEPS, 4.0, state, (), image=image)


def files_under(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file()) if folder.is_dir() else []


# --- Compare ---------------------------------------------------------------------------------------------------
def test_the_image_input_is_shown_for_a_teacher_that_takes_an_image_only(store, i2v):
    assert i2v[1]["visible"] is True and i2v[1]["value"] is None
    hidden = teacher_picker.on_load_teacher(store, BUILTIN, "")[-1]
    assert hidden["visible"] is False and hidden["value"] is None
    # the pickers offer image-to-video checkpoints now that the app takes an image
    assert "Wan-AI/Wan2.1-I2V-14B-480P-Diffusers" in teacher_picker.teacher_choices(store)


def test_compare_samples_the_teachers_sample_on_the_uploaded_image_on_both_sides(store, i2v, uploads):
    state, _ = i2v
    out = compare_student(store, state, uploads[0])
    run = out[5]
    assert run is not None, out[4]
    assert "Baseline" in out[2] and out[0]["value"].endswith(".mp4")
    teacher = store.teacher(state["name"], state["options"])
    expected = teacher.sample([PROMPT], seed=3, schedule=PhaseSchedule.from_dict(TWO_STEPS), cfg=4.0,
                              images=[open_image(uploads[0])])
    frames = teacher.decode(expected.sample).cpu()[0]
    assert np.abs(np.asarray(run["image"], float) - np.asarray(comparison.still(frames), float)).max() <= 1
    done = compare.on_compare_teacher(store, run, 4, 4.0, progress=lambda *a, **k: None)
    assert done[-1] == "Done." and done[0]["value"].endswith(".mp4") and "NFE 8" in done[2], done[-1]
    # the other image: both sides change (the student's first frame, the teacher's boundary states) beyond the
    # one display level of float rounding (the tiny random network reads the image weakly)
    other = compare_student(store, state, uploads[1])[5]
    assert np.abs(np.asarray(other["image"], float) - np.asarray(run["image"], float)).max() > 2
    strip = compare.on_compare_teacher(store, other, 4, 4.0, progress=lambda *a, **k: None)[4]
    assert np.abs(np.asarray(strip, float) - np.asarray(done[4], float)).max() > 2


def test_without_an_image_a_teacher_that_needs_one_refuses_in_one_line(store, i2v):
    out = compare_student(store, i2v[0])
    assert out[5] is None
    assert "samples from an image and cannot run from the prompt alone: upload an image" in out[4]
    assert "\n" not in out[4]


def test_a_text_only_teacher_refuses_an_image_sent_anyway(store, uploads):
    out = compare.on_compare_student(store, "a red star on a dark background", 0, False, students.BASELINE,
                                     comparison.AS_TRAINED, TWO_STEPS, 4.0, BUILTIN, (), image=uploads[0])
    assert out[5] is None and "builtin is a text-only teacher: it takes no image; remove the image" in out[4]


def test_a_student_takes_an_image_exactly_when_it_was_distilled_on_them(store, i2v, uploads, runs):
    """A student's experts learnt from an image or without one: Compare refuses the other, in one line naming the
    student and not its folder."""
    from test_diffusers_teachers import random_student

    from pdmd.students.manifest import Manifest

    state, _ = i2v
    teacher = store.teacher(state["name"], state["options"])
    folder = runs / "jobs" / "text-only" / "student"
    random_student(teacher, PhaseSchedule.from_dict(TWO_STEPS), folder)
    assert Manifest.read(folder).conditions == ()
    out = compare.on_compare_student(store, PROMPT, 3, False, str(folder), comparison.AS_TRAINED, TWO_STEPS, 4.0,
                                     state, (), image=uploads[0])
    assert out[5] is None and "text-only was distilled on prompts alone: it takes no image" in out[4]
    assert str(runs) not in out[4]


def test_bad_image_files_are_refused_in_one_line_naming_the_file(store, i2v, tmp_path, runs):
    for path, problem in bad_files(tmp_path / "sent").values():
        out = compare_student(store, i2v[0], str(path))
        assert out[5] is None and problem in out[4] and "\n" not in out[4], out[4]
        assert str(tmp_path) not in out[4]  # the file by its own name, not where the server keeps it
    assert files_under(runs) == []


def test_rows_with_different_images_share_a_batch_and_each_equals_its_request_alone(store, i2v, uploads):
    state, _ = i2v
    first, second = (open_image(path) for path in uploads)
    side = comparison.teacher_side(store, state["name"], state["options"], PhaseSchedule((0.5,), (1, 1), 5.0), 4.0)
    rows = [Row((PROMPT,), 0, (first,)), Row(("two blue dogs", PROMPT), 7, (second, first)),
            Row((PROMPT,), 0, (second,))]
    together = comparison._sample_side(side, rows)
    for row, batched in zip(rows, together):
        (alone,) = comparison._sample_side(side, [row])
        assert batched.pictures.shape == alone.pictures.shape == (len(row.prompts), SIZE[2], 3, SIZE[0], SIZE[1])
        assert (batched.pictures - alone.pictures).abs().max() < 1e-4
        assert [s.t for s in batched.states] == [0.5]
    assert (together[0].pictures - together[2].pictures).abs().max() > 1e-2  # same prompt and seed, other image
    with pytest.raises(comparison.InputError, match=r"^1 image\(s\) for 2 prompt\(s\): give one per prompt$"):
        comparison.sample_side(side, [Row((PROMPT, PROMPT), 0, (first,))])


def test_the_image_crosses_the_zero_gpu_boundary_with_its_row(zero_gpu, store, i2v, uploads):  # noqa: F811
    run = compare_student(store, i2v[0], uploads[0])[5]
    done = compare.on_compare_teacher(store, run, 4, 4.0, progress=lambda *a, **k: None)
    assert done[-1] == "Done."
    assert [name for name, _ in zero_gpu] == ["_sample_side"] * 2  # the rows, images in them, pickled across


# --- the API: bad files through gradio_client ------------------------------------------------------------------
@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """The app served in this process as app.py serves it (ui.app.launch_settings); its runs and downloads in
    temporary folders. The URL and those two folders."""
    from pdmd.training.jobs import JobManager
    from ui.app import build_app, launch_settings

    runs_dir, downloads = tmp_path_factory.mktemp("api-runs"), tmp_path_factory.mktemp("api-downloads")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PDMD_RUNS_DIR", str(runs_dir))
        patch.setattr(comparison, "DOWNLOAD_DIR", downloads)
        manager = JobManager()
        app = build_app(ModelStore(), manager=manager)
        try:
            app.queue().launch(prevent_thread_lock=True, quiet=True, server_name="127.0.0.1", **launch_settings())
            yield app.local_url, runs_dir, downloads
        finally:
            app.close()
            manager.stop_supervisor()


def test_bad_uploads_through_the_api_are_refused_in_one_line_and_leave_nothing(served, tmp_path):
    from gradio_client import Client, handle_file

    url, runs_dir, downloads = served
    before = files_under(runs_dir)
    client = Client(url, verbose=False)
    for path, problem in bad_files(tmp_path / "sent").values():
        status = client.predict("a red star on a dark background", 0, False, students.BASELINE,
                                comparison.AS_TRAINED, 4.0, [], handle_file(str(path)), api_name="/compare_student")[4]
        assert problem in status and "\n" not in status, status
    assert files_under(runs_dir) == before and files_under(downloads) == []


def test_a_server_path_sent_as_the_image_is_not_read(served, tmp_path):
    """A call that names a file on the server instead of uploading one: gradio refuses a path outside its upload
    cache before the handler runs, so no visitor can make the app open (or show) a file of the server's."""
    import sys
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from app_latency import RestClient

    url, _, _ = served
    secret = Path(picture_file(tmp_path / "server", "private.png", 5))
    client = RestClient(url)

    def call(image):
        return client.predict("a red star on a dark background", 0, False, students.BASELINE, comparison.AS_TRAINED,
                              4.0, [], image, api_name="/compare_student")
    assert "Student done" in call(None)[4]  # the same call, no image: answered
    with pytest.raises(RuntimeError, match="compare_student"):  # gradio's refusal: an error event, no outputs
        call({"path": str(secret), "meta": {"_type": "gradio.FileData"}})


# --- the Showcase: examples with an image ----------------------------------------------------------------------
def showcase_yaml(folder: Path, model: Path, image: str) -> Path:
    (folder / "lora.safetensors").write_bytes(b"")  # a published student's file: only its presence is read here
    file = folder / "showcase.yaml"
    file.write_text(f"teachers:\n  - name: i2v\n    model: {model}\n    height: 16\n    width: 32\n    frames: 5\n"
                    f"    students:\n      - {{name: fast, lora: [lora.safetensors], steps: [2]}}\n"
                    f"    examples:\n      - {{prompt: a cat turns, seed: 3, image: {image}}}\n")
    return file


def test_showcase_examples_carry_an_image_and_a_bad_one_stops_the_app(folder, tmp_path, uploads):
    from ui.showcase import ShowcaseStore, build_showcase_tab, takes_image

    showcase = Showcase.read(showcase_yaml(tmp_path, folder, uploads[0]))
    assert showcase.teachers[0].examples == (("a cat turns", 3, Path(uploads[0]).resolve()),)
    store = ShowcaseStore(showcase)
    assert takes_image(store, "i2v/fast") and not store.is_loaded(showcase.teachers[0])  # known without loading
    import gradio as gr
    with gr.Blocks() as page:
        build_showcase_tab(store)
    box = next(b for b in page.blocks.values() if getattr(b, "elem_id", None) == "showcase-image")
    assert box.visible
    bad = bad_files(tmp_path / "bad")["truncated"][0]
    with pytest.raises(ShowcaseError, match=r"^showcase.yaml: teachers\[i2v\].examples\[0\].image: .*cut.jpg: the "
                                            "image data is damaged or cut short"):
        Showcase.read(showcase_yaml(tmp_path, folder, str(bad)))
