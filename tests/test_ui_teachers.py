"""The app with real (tiny) diffusers teachers: picking and loading a teacher by folder or Hub id, its students
only, Wan video as mp4s (GIFs without an mp4 writer), published LoRAs imported as students with a strength per
phase, and what a teacher that cannot load says. Handlers are called as plain functions."""
from __future__ import annotations

import json
from pathlib import Path

import huggingface_hub
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from pdmd import limits
from pdmd.core.schedule import PRESETS, PhaseSchedule
from pdmd.paths import SHIPPED_STUDENTS
from pdmd.students import lora_formats as lf
from pdmd.students.manifest import Manifest
from ui import compare, comparison, models, student_files, students, teacher_picker
from ui.models import ModelStore

PROMPT = "a small boat at dawn"
LIGHTNING = PRESETS["wan2.2-lightning"]  # every phase-2 step below the A14B experts' switch at 0.875
WAN_SIZE = (16, 16, 5)  # height, width, frames: a few frames of the tiny Wan 2.2


def no_progress(*args, **kwargs):
    pass


def skipped(value) -> bool:
    return value == {"__type__": "update"}  # gr.skip(): nothing changes


@pytest.fixture(autouse=True)
def runs_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("PDMD_RUNS_DIR", str(tmp_path / "runs"))
    return tmp_path / "runs"


@pytest.fixture(scope="module")
def store():
    return ModelStore()


@pytest.fixture
def wan(store, tiny_pipeline):
    """The tiny Wan 2.2 (two experts) loaded through the app's teacher box; returns its teacher state."""
    state, status, *_ = teacher_picker.on_load_teacher(store, compare.BUILTIN, str(tiny_pipeline("wan2.2")), *WAN_SIZE)
    assert "✓" in status, status
    return state


def lightning_files(folder: Path, teacher, seed: int = 0) -> list[str]:
    """A Wan2.2-Lightning-style pair: original Wan module names under ``diffusion_model.``, lora_A/lora_B and
    alpha, one file for each expert (the names sort high before low, as the published ones do)."""
    generator = torch.Generator().manual_seed(seed)
    paths = []
    pipe = teacher.pipe
    for name, network in (("high_noise_model", pipe.transformer), ("low_noise_model", pipe.transformer_2)):
        state = {}
        for module, layer in network.named_modules():
            if isinstance(layer, torch.nn.Linear) and module.startswith("blocks.") and ".lora_" not in module:
                # a teacher already carrying a student has its Linears wrapped by PEFT as <module>.base_layer
                original = f"diffusion_model.{lf.wan_original_name(module.removesuffix('.base_layer'))}"
                state[f"{original}.lora_A.weight"] = torch.randn(4, layer.in_features, generator=generator)
                state[f"{original}.lora_B.weight"] = torch.randn(layer.out_features, 4, generator=generator)
                state[f"{original}.alpha"] = torch.tensor(4.0)
        paths.append(str(folder / f"{name}.safetensors"))
        save_file(state, paths[-1])
    return paths


def run_student(store, value, teacher, schedule=LIGHTNING, prompt=PROMPT, seed=0):
    return compare.on_compare_student(store, prompt, seed, False, value, comparison.AS_TRAINED, schedule.as_dict(), 1.0,
                                      teacher)


def import_published(store, files, teacher, schedule=LIGHTNING, strengths=(), sliders=limits.MAX_PHASES):
    """Published LoRA files imported as the page sends them: ``strengths`` first, the other sliders at 1."""
    values = [*strengths, *[1.0] * (sliders - len(strengths))]
    return student_files.on_import_published(store, files, teacher, schedule.as_dict(), 1.0, *values)


def gif_frames(path: str) -> int:
    with Image.open(path) as picture:
        return picture.n_frames


def mp4_shape(path: str) -> tuple[int, int, int]:
    """(frames, height, width) of an mp4, read back through ffmpeg."""
    import imageio.v2 as imageio
    frames = imageio.mimread(path, format="FFMPEG")
    return len(frames), *frames[0].shape[:2]


# --- picking and loading a teacher ---------------------------------------------------------------------------
def test_loading_a_pipeline_folder_sets_the_teacher_its_defaults_and_its_students(store, wan, tiny_pipeline):
    state, status, picker, steps, cfg, teachers, image = teacher_picker.on_load_teacher(
        store, "builtin", str(tiny_pipeline("wan2.2")), *WAN_SIZE)
    assert image == {"__type__": "update", "visible": False, "value": None}  # a text-to-video teacher: no image
    assert state == wan and state["options"] == {"height": 16, "width": 16, "num_frames": 5}
    assert teachers["value"] == state["name"] == str(tiny_pipeline("wan2.2").resolve())
    assert "wan" in status and "video" in status and "transformer_2" in status
    assert steps["value"] == 40 and cfg["value"] == 5.0  # Wan 2.2 A14B's own defaults
    assert [value for _, value in picker["choices"]] == [students.BASELINE]  # builtin's students are not its
    assert str(tiny_pipeline("wan2.2").resolve()) in teacher_picker.teacher_choices(store)


def test_a_hub_id_without_network_asks_for_a_local_folder(store, monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    state, status, *rest = teacher_picker.on_load_teacher(store, "nobody-here/no-such-model", "")
    assert skipped(state) and "could not download" in status and "pass a local folder" in status
    assert "pdmd-error" in status and all(skipped(v) for v in rest)


def test_a_folder_with_no_supported_pipeline_names_what_it_found(store, tmp_path):
    (tmp_path / "sdxl").mkdir()
    (tmp_path / "sdxl" / "model_index.json").write_text('{"_class_name": "StableDiffusionXLPipeline"}')
    status = teacher_picker.on_load_teacher(store, "builtin", str(tmp_path / "sdxl"))[1]
    assert "StableDiffusionXLPipeline" in status and "WanPipeline" in status and "QwenImagePipeline" in status
    status = teacher_picker.on_load_teacher(store, "builtin", str(tmp_path / "nothing-here"))[1]
    assert "no such folder" in status
    assert "height" in teacher_picker.on_load_teacher(store, "builtin", "", -3)[1]


# --- Wan video in Compare ------------------------------------------------------------------------------------
def test_wan_baseline_and_teacher_play_mp4s_and_use_first_frames(store, wan):
    video, image, caption, _, _, run = run_student(store, students.BASELINE, wan)
    assert video["visible"] and not image["visible"] and video["value"].endswith(".mp4")
    assert mp4_shape(video["value"]) == (WAN_SIZE[2], 256, 256)  # 16x16 frames enlarged for the page
    assert "Baseline" in caption and "NFE 4" in caption and run["teacher"]["name"] == wan["name"]
    teacher_video, teacher_image, teacher_caption, _, strip, download, slider, done = \
        compare.on_compare_teacher(store, run, 8, 5.0, progress=no_progress)
    assert teacher_video["visible"] and not teacher_image["visible"] and mp4_shape(teacher_video["value"])[0] == 5
    assert "NFE 16" in teacher_caption and done == "Done."
    assert not slider["visible"]  # videos play side by side; the before/after slider is for images
    assert isinstance(strip, Image.Image) and Image.open(download).size[0] > 2 * 16


def test_without_an_mp4_writer_wan_falls_back_to_gifs(store, wan, monkeypatch):
    from pdmd import media

    def no_ffmpeg(videos, path, **kwargs):
        if path.suffix == ".mp4":
            raise ValueError(f"writing {path} needs imageio and imageio-ffmpeg")
        return media.save_video(videos, path, **kwargs)
    monkeypatch.setattr(comparison, "save_video", no_ffmpeg)
    video, image, caption, *_ = run_student(store, students.BASELINE, wan)
    assert not video["visible"] and image["visible"] and image["value"].endswith(".gif")
    assert gif_frames(image["value"]) == WAN_SIZE[2] and "NFE 4" in caption


def test_any_prompt_is_fine_for_a_real_teacher(store, wan):
    status = run_student(store, students.BASELINE, wan, prompt="a red blue star, photographed")[4]
    assert "pdmd-error" not in status  # the built-in grammar applies to the built-in teacher only


def test_diversity_is_for_the_builtin_probe_only(store, wan):
    outputs = compare.on_diversity(store, PROMPT, 0, 4, students.BASELINE, comparison.AS_TRAINED, LIGHTNING.as_dict(),
                                   8, 5.0, wan, progress=no_progress)
    assert skipped(outputs[0]) and "built-in teacher only" in outputs[2]


# --- published LoRAs as students -----------------------------------------------------------------------------
def test_lightning_pair_imports_as_a_two_expert_student_and_runs(store, wan, tmp_path, runs_dir):
    teacher = store.teacher(wan["name"], wan["options"])
    files = lightning_files(tmp_path, teacher)
    picker, status = import_published(store, files, wan, strengths=(1, 0.5))
    assert "✓" in status, status
    assert "phase 1 ← high_noise_model.safetensors × 1 → transformer" in status
    assert "phase 2 ← low_noise_model.safetensors × 0.5 → transformer_2" in status
    folder = Path(picker["value"])
    assert runs_dir / "uploads" in folder.parents and folder.name.startswith(lf.PUBLISHED)
    assert Manifest.read(folder).networks == ("transformer", "transformer_2")
    assert [v for _, v in picker["choices"]] == [students.BASELINE, str(folder)]

    video, _, caption, _, _, run = run_student(store, str(folder), wan)
    assert mp4_shape(video["value"])[0] == WAN_SIZE[2] and "NFE 4" in caption and run["teacher"]["name"] == wan["name"]
    assert "Published student" in compare.describe_student(store, str(folder), comparison.AS_TRAINED, LIGHTNING.as_dict())
    baseline = run_student(store, students.BASELINE, wan)[5]
    assert run["image"].tobytes() != baseline["image"].tobytes()  # the LoRAs change the video
    again = import_published(store, files, wan, strengths=(1, 0.5))[0]
    assert again["value"] == str(folder)  # same files and strengths: the same student, not a copy

    # the builtin teacher's picker does not offer it; picking it for the builtin teacher says whose it is
    update = compare.on_refresh_students(str(folder), compare.BUILTIN)
    assert str(folder) not in [v for _, v in update["choices"]] and update["value"] != str(folder)
    status = run_student(store, str(folder), compare.BUILTIN, prompt="a red star on a dark background")[4]
    assert "is a student of" in status and "load its teacher first" in status


def test_a_student_exports_as_a_zip_in_either_layout(store, wan, tmp_path):
    import zipfile

    files = lightning_files(tmp_path, store.teacher(wan["name"], wan["options"]))
    folder = import_published(store, files, wan)[0]["value"]
    for layout in lf.EXPORT_LAYOUTS:
        archive, status = student_files.on_export_student(store, folder, layout, wan)
        assert "✓ 2 file(s)" in status
        with zipfile.ZipFile(archive) as zipped:
            names = zipped.namelist()
            assert "export.json" in names and len(names) == 3
            described = json.loads(zipped.read("export.json"))
        assert [p["network"] for p in described["phases"]] == ["transformer", "transformer_2"]
    assert "baseline is the teacher" in student_files.on_export_student(store, students.BASELINE, "comfyui", wan)[1]
    shipped = str(SHIPPED_STUDENTS / "phased")
    assert "names no model family" in student_files.on_export_student(store, shipped, "diffusers", compare.BUILTIN)[1]


def test_strength_zero_is_the_teacher(store, wan, tmp_path):
    files = lightning_files(tmp_path, store.teacher(wan["name"], wan["options"]))
    picker, status = import_published(store, files, wan, strengths=(0, 0))
    assert "✓" in status, status
    student = run_student(store, picker["value"], wan)[5]["image"]
    baseline = run_student(store, students.BASELINE, wan)[5]["image"]  # the teacher on the same schedule, CFG 1
    assert student.tobytes() == baseline.tobytes()


@pytest.mark.parametrize("files, strengths, schedule, needle", [  # strengths as an API caller may send them
    ("pair", (1,), LIGHTNING, "1 strength(s) for 2 phase(s)"),
    ("pair", (1, "many"), LIGHTNING, "phase 2 strength 'many' is not a number"),
    ("pair", (1, 9), LIGHTNING, "phase 2 strength 9 must lie between 0 and 2"),
    ("pair", (-0.5, 1), LIGHTNING, "phase 1 strength -0.5 must lie between 0 and 2"),
    ("pair", (1, float("nan")), LIGHTNING, "phase 2 strength nan must lie between 0 and 2"),
    ("high", (1, 1), LIGHTNING, "1 LoRA file(s) for a 2-phase schedule"),
    ("pair", (1, 1), PhaseSchedule((0.875,), (2, 2), 5.0), "phase 2 runs on more than one network"),
    ("pickle", (1, 1), LIGHTNING, "pickle"),
    ("none", (1, 1), LIGHTNING, "no files uploaded"),
])
def test_bad_published_imports_give_a_message_and_leave_nothing(store, wan, tmp_path, runs_dir, files, strengths,
                                                                schedule, needle):
    pair = lightning_files(tmp_path, store.teacher(wan["name"], wan["options"]))
    (tmp_path / "lora.ckpt").write_bytes(b"not opened")
    chosen = {"pair": pair, "high": pair[:1], "pickle": [pair[0], str(tmp_path / "lora.ckpt")], "none": None}[files]
    picker, status = student_files.on_import_published(store, chosen, wan, schedule.as_dict(), 1.0, *strengths)
    assert skipped(picker) and needle in status and "pdmd-error" in status
    assert not list((runs_dir / "uploads").glob("*")) if (runs_dir / "uploads").exists() else True


def test_a_lora_for_another_model_lists_its_unmatched_keys(store, wan, tmp_path):
    state = {"diffusion_model.blocks.30.self_attn.q.lora_A.weight": torch.zeros(4, 24),
             "diffusion_model.blocks.30.self_attn.q.lora_B.weight": torch.zeros(24, 4)}
    for name in ("a", "b"):
        save_file(state, str(tmp_path / f"{name}.safetensors"))
    status = import_published(store, [str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors")], wan)[1]
    assert "match no module" in status and "blocks.30.attn1.to_q.lora_A.weight" in status


def test_the_builtin_teacher_takes_no_published_lora(store, tmp_path):
    save_file({"transformer.a.lora_A.weight": torch.zeros(1, 1)}, str(tmp_path / "x.safetensors"))
    status = import_published(store, [str(tmp_path / "x.safetensors")], compare.BUILTIN, PhaseSchedule.uniform(4))[1]
    assert "not a diffusers pipeline" in status


def test_a_single_qwen_image_lightning_file_on_a_one_phase_schedule(store, tiny_pipeline, tmp_path):
    state, status, *_ = teacher_picker.on_load_teacher(store, "builtin", str(tiny_pipeline("qwen-image")), 32, 32)
    assert "qwen-image" in status and "image" in status
    network = store.teacher(state["name"], state["options"]).model
    generator = torch.Generator().manual_seed(5)
    lora = {}
    for module, layer in network.named_modules():
        if isinstance(layer, torch.nn.Linear) and ".attn." in module:  # bare names, kohya suffixes, alpha
            lora[f"{module}.lora_down.weight"] = torch.randn(2, layer.in_features, generator=generator)
            lora[f"{module}.lora_up.weight"] = torch.randn(layer.out_features, 2, generator=generator)
            lora[f"{module}.alpha"] = torch.tensor(1.0)
    save_file(lora, str(tmp_path / "Qwen-Image-Lightning-8steps-V1.0.safetensors"))  # the published name
    eight = PhaseSchedule((), (8,), 3.0)
    lightning = str(tmp_path / "Qwen-Image-Lightning-8steps-V1.0.safetensors")
    picker, status = import_published(store, [lightning], state, eight)
    assert "✓" in status and Manifest.read(Path(picker["value"])).networks is None
    _, image, caption, *_ = run_student(store, picker["value"], state, schedule=eight)
    assert image["value"].size == (256, 256) and "NFE 8" in caption


# --- memory: a big teacher is shared with its one student, never copied -------------------------------------------
def test_a_big_teacher_carries_its_student_and_reloads_for_another(tiny_pipeline, tmp_path, monkeypatch):
    monkeypatch.setattr(models, "COPY_BELOW_BYTES", 0)  # every teacher counts as big
    store = ModelStore()
    state = teacher_picker.on_load_teacher(store, "builtin", str(tiny_pipeline("wan2.2")), *WAN_SIZE)[0]
    teacher = store.teacher(state["name"], state["options"])
    before = run_student(store, students.BASELINE, state)[5]["image"]
    first = Path(import_published(store, lightning_files(tmp_path, teacher, seed=1), state)[0]["value"])
    assert store.student(first).student.roles.teacher is teacher  # no copy: the student is on the teacher's network
    assert store.student(first).lock is store.teacher_lock(state["name"], state["options"])
    assert run_student(store, students.BASELINE, state)[5]["image"].tobytes() == before.tobytes()  # adapters off
    (tmp_path / "second").mkdir()
    second = Path(import_published(store, lightning_files(tmp_path / "second", teacher, seed=2), state)[0]["value"])
    assert store.teacher(state["name"], state["options"]) is not teacher  # loaded afresh for the second student
    one, two = (run_student(store, str(f), state)[5]["image"].tobytes() for f in (first, second))
    assert one != two
    assert run_student(store, students.BASELINE, state)[5]["image"].tobytes() == before.tobytes()


def test_one_big_teacher_at_a_time(tiny_pipeline, monkeypatch):
    monkeypatch.setattr(models, "COPY_BELOW_BYTES", 0)  # every teacher counts as big
    store = ModelStore()
    store.teacher()  # the built-in default stays whatever else is loaded
    wan = teacher_picker.on_load_teacher(store, "builtin", str(tiny_pipeline("wan2.2")), *WAN_SIZE)[0]
    qwen = teacher_picker.on_load_teacher(store, "builtin", str(tiny_pipeline("qwen-image")), 32, 32)[0]
    assert store.loaded_teachers() == [compare.BUILTIN, qwen["name"]] and wan["name"] != qwen["name"]
    assert "✓" in teacher_picker.on_load_teacher(store, "builtin", wan["name"], *WAN_SIZE)[1]  # loads again when asked
    assert store.loaded_teachers() == [compare.BUILTIN, wan["name"]]


def test_a_student_saved_with_full_options_reuses_the_loaded_teacher(store, wan):
    teacher = store.teacher(wan["name"], wan["options"])
    assert store.teacher(wan["name"], teacher.options()) is teacher
    assert store.teacher(wan["name"] + "/", dict(wan["options"])) is teacher  # the same folder, however typed


def test_a_public_server_loads_only_its_own_teacher(tiny_pipeline, tmp_path, runs_dir):
    """With training off (a public Space), the teacher box and uploaded manifests cannot make the server load a
    model of the visitor's choosing; the built-in teacher and its students work as before."""
    store = ModelStore(other_teachers=False)
    state, status, *_ = teacher_picker.on_load_teacher(store, "builtin", str(tiny_pipeline("wan2.2")), *WAN_SIZE)
    assert skipped(state) and "turned off on this public server" in status
    assert "✓" in teacher_picker.on_load_teacher(store, "builtin", "")[1]
    student = tmp_path / "student"
    student.mkdir()
    (student / "manifest.json").write_text(json.dumps({
        "teacher": "Wan-AI/Wan2.2-T2V-A14B-Diffusers", "schedule": LIGHTNING.as_dict(),
        "phases": ["phase_1.safetensors", "phase_2.safetensors"], "lora": {"rank": 1, "alpha": 1,
                                                                          "target_modules": ["to_q"]}}))
    for k in (1, 2):
        save_file({"transformer.a.lora_A.weight": torch.zeros(1, 1)}, str(student / f"phase_{k}.safetensors"))
    picker, message = student_files.on_upload(store, [str(p) for p in student.iterdir()])
    assert skipped(picker) and "turned off on this public server" in message
    assert not list((runs_dir / "uploads").glob("*"))  # the refused upload is removed
