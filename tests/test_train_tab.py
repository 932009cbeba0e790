"""The Train tab's callbacks as plain functions: presets, validation messages, the gate, one real job."""
from __future__ import annotations

import json
import os
import shutil
import signal
import time
import zipfile
from functools import partial

import pytest
import yaml
from PIL import Image

from pdmd.paths import SHIPPED_STUDENTS
from pdmd.students.manifest import Manifest
from pdmd.training import jobs
from pdmd.training.config import TrainConfig
from pdmd.training.gate import Gate
from pdmd.training.jobs import JobManager
from pdmd.training.run_folder import RunFolder
from ui import students, train, train_form, train_retrain
from pdmd.plan.architectures import config_folder, shipped_checkpoints
from pdmd.teachers import PIPELINES, read_model_index
from ui.app import build_app
from ui.teacher_picker import supported_pipelines

OPEN = Gate("on")
LOCKED = Gate("token", token="s3cret")


def skipped(value) -> bool:
    return isinstance(value, dict) and value.get("__type__") == "update" and len(value) == 1


@pytest.fixture
def manager(tmp_path, monkeypatch):
    monkeypatch.setenv("PDMD_RUNS_DIR", str(tmp_path / "runs"))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    manager = JobManager(device="cpu")  # runs/jobs under the temporary runs folder, as the app makes it
    yield manager
    for job in manager.jobs():
        if jobs.is_alive(job.pid, job.pid_started):
            os.killpg(job.pid, signal.SIGKILL)


def fields(preset=train_form.QUICK, **changes) -> list:
    """The form's values in on_start's order (after token, name, threads), as the preset fills them."""
    values = dict(zip(train_form.FORM_FIELDS, train_form.preset_fields(preset)))
    values.update(changes)
    phases = {"boundaries": [0.6], "steps": [1, 3], "shift": 2.0}
    names = train_form.FORM_FIELDS
    return [preset, *[values[n] for n in names[:6]], phases, *[values[n] for n in names[6:]]]


TWO_PHASES = dict(schedule_source=train_form.EDIT_HERE, boundaries="0.5", schedule_steps="1, 1", shift="1")


@pytest.mark.parametrize("preset", list(train_form.PRESET_FILES))
def test_a_preset_untouched_is_exactly_its_config_file(preset):
    """`python -m pdmd train --config configs/<preset>.yaml` is the tab's run: every field, the schedule too."""
    path = train_form.PRESET_FILES[preset]
    from_form = TrainConfig.from_dict(train_form.form_config(*fields(preset)), output_dir="x").as_dict()
    assert from_form == TrainConfig.from_yaml(path, output_dir="x").as_dict()
    assert train_form.preset_fields(preset)[2] == train_form.EDIT_HERE  # the file's schedule, not the method's


def test_an_unknown_or_unreadable_preset_is_one_line_and_changes_nothing(manager, monkeypatch, tmp_path):
    assert all(skipped(value) for value in train.on_preset("nope"))
    text, picker = train.on_start(manager, OPEN, None, "", 1, *["nope", *fields()[1:]])
    assert "pdmd-error" in text and "unknown preset 'nope'" in text and skipped(picker)
    broken = tmp_path / "broken.yaml"
    broken.write_text("teacher: [unclosed")
    monkeypatch.setitem(train_form.PRESET_FILES, "broken", broken)
    assert all(skipped(value) for value in train.on_preset("broken"))
    text, _ = train.on_start(manager, OPEN, None, "", 1, *["broken", *fields()[1:]])
    assert "pdmd-error" in text and "preset 'broken'" in text and "cannot be read" in text
    assert manager.jobs() == []


def test_schedule_sources():
    phases = train_form.form_config(*fields(schedule_source=train_form.FROM_PHASES))
    assert phases["schedule"] == {"boundaries": [0.6], "steps": [1, 3], "shift": 2.0}
    edited = train_form.form_config(*fields(schedule_source=train_form.EDIT_HERE, boundaries="0.8, 0.4",
                                            schedule_steps="1", shift="3"))
    assert edited["schedule"]["boundaries"] == [0.8, 0.4] and edited["schedule"]["shift"] == 3.0
    single = train_form.form_config(*fields(method="dmd-sgts", schedule_source=train_form.METHOD_DEFAULT))
    assert single["schedule"]["steps"] == [4]  # the method's own: 1 phase x 4 steps


@pytest.mark.parametrize("changes, name, threads, message", [
    ({"lr_generator": 0}, "", 1, "lr_generator = 0 must be greater than 0"),
    ({"lr_fake": None}, "", 1, "lr_fake = None must be a number"),
    ({"batch_size": -2}, "", 1, "batch_size = -2 must be greater than 0"),
    ({"rank": 0}, "", 1, "lora.rank = 0 must be greater than 0"),
    ({"updates_per_phase": "ten"}, "", 1, "updates_per_phase[0] = 'ten' must be a number"),
    ({**TWO_PHASES, "updates_per_phase": "5, 5, 5"}, "", 1, "does not fit the schedule's 2 phases"),
    ({"updates_per_phase": " "}, "", 1, "updates per phase is empty"),
    ({"method": "dmd", "schedule_source": train_form.FROM_PHASES}, "", 1, "is single-phase"),
    ({"schedule_source": train_form.EDIT_HERE, "boundaries": "0.5, 1.5"}, "", 1, "boundary 1.5 must lie strictly"),
    ({}, "../escape", 1, "run name '../escape' is not allowed"),
    ({}, "a/b", 1, "no slashes"),
    ({}, "", 0, "CPU threads 0 must be a whole number from 1"),
    ({}, "", "two", "CPU threads 'two' is not a number"),
])
def test_bad_input_is_a_visible_message_and_starts_nothing(manager, changes, name, threads, message):
    text, picker = train.on_start(manager, OPEN, None, name, threads, *fields(**changes))
    assert "pdmd-error" in text and message in text and skipped(picker)
    assert manager.jobs() == []


def test_a_conditions_folder_reaches_the_job_and_a_bad_image_starts_nothing(manager, tmp_path, tiny_pipeline):
    """The Train tab's condition images: a folder goes into the job's config as condition_images (with the drawing
    choice beside it), a bad image in it is one line naming the file and no job, and either field empty is the
    preset's text-only run (test_a_preset_untouched_is_exactly_its_config_file)."""
    images = tmp_path / "firsts"
    images.mkdir()
    for name in ("a.png", "b.png"):
        Image.new("RGB", (8, 8), "red").save(images / name)
    (images / "prompts.txt").write_text("a red wall\na red door\na broken file\n")
    (images / "c.png").write_text("not a picture")
    teacher = str(tiny_pipeline("wan2.2-ti2v"))
    fields_of = partial(fields, teacher=teacher, sample_prompts="")  # the grid shows the first condition images
    text, picker = train.on_start(manager, OPEN, None, "", 1, *fields_of(condition_images=str(images)))
    assert "pdmd-error" in text and "condition_images: " in text and "/firsts/c.png: not an image" in text
    assert skipped(picker) and manager.jobs() == []
    text, _ = train.on_start(manager, OPEN, None, "", 1, *fields_of(condition_images=str(images),
                                                                     condition_teacher="self"))
    assert "give one" in text and manager.jobs() == []  # images and a drawing teacher both
    (images / "c.png").unlink()
    (images / "prompts.txt").write_text("a red wall\na red door\n")
    config = train_form.form_config(*fields_of(condition_images=f" {images} \n"))  # what on_start submits
    assert config["condition_images"] == str(images) and "condition_teacher" not in config
    assert "probe_every" not in config  # the preset's probe measures the built-in teacher only
    assert TrainConfig.from_dict(config, output_dir="x").condition_pairs()[1][1] == "a red door"


def test_the_gate_refuses_every_request_without_the_token(manager):
    text, _ = train.on_start(manager, LOCKED, "wrong", "gated", 1, *fields())
    assert "wrong or missing training token" in text and manager.jobs() == []
    for answer in (train.on_stop(manager, LOCKED, None, 1), train.on_stop(manager, LOCKED, "", 1, force=True),
                   train.on_resume(manager, LOCKED, "nope", 1),
                   train.on_request(manager, LOCKED, "save", None, 1)):
        assert "wrong or missing training token" in answer
    off = Gate.from_env({"PDMD_TRAINING": "off"})
    assert "training is turned off" in train.on_start(manager, off, "s3cret", "x", 1, *fields())[0]


def poll_until(manager, job_id, condition, seen=None):
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        manager.poll()
        out = train.on_poll(manager, job_id, seen)
        seen = out[-1]
        if condition(manager.get(job_id)):
            return train.on_poll(manager, job_id, {})  # everything, freshly drawn
        time.sleep(0.2)
    raise AssertionError(f"job {job_id}: {manager.get(job_id).status}\n{manager.get(job_id).run.log_tail()}")


def test_a_job_from_start_to_its_student_in_compare(manager, monkeypatch, tmp_path):
    # the quick preset with its warm start on 4 teacher trajectories, not 32, and no probe curve (96 images a
    # point; tests/test_trainer.py holds it): the same job path at a fraction of the cost
    quick = {**yaml.safe_load(train_form.PRESET_FILES[train_form.QUICK].read_text()), "regression_pairs": 4,
             "probe_every": 0}
    (tmp_path / "quick.yaml").write_text(yaml.safe_dump(quick))
    monkeypatch.setitem(train_form.PRESET_FILES, train_form.QUICK, tmp_path / "quick.yaml")
    tiny = dict(TWO_PHASES, updates_per_phase="2", batch_size=1, fake_ratio=1, rank=2, alpha=2, sample_every=2,
                checkpoint_every=1, sample_prompts="a red circle")
    text, picker = train.on_start(manager, LOCKED, "s3cret", "first", 1, *fields(**tiny))
    assert "started (4 steps)" in text and picker["value"] == 1
    second, _ = train.on_start(manager, LOCKED, "s3cret", "second", 1, *fields(**tiny))
    assert "queued: #1 first is running" in second  # one job per device: a visible message
    assert "removed from the queue" in train.on_stop(manager, LOCKED, "s3cret", 2)
    assert manager.get(2).status == jobs.STOPPED
    assert "pdmd-error" in train.on_resume(manager, LOCKED, "s3cret", 1)  # running: nothing to resume

    (progress, generator, fake, adherence, fd, sample, log, command, table, job_picker, download, changed,
     seen) = poll_until(manager, 1, lambda j: j.status == jobs.FINISHED)
    assert "finished · step 4/4 (100%)" in progress and "<progress value='4' max='4'" in progress
    # the quick preset opens each 2-update phase with one regression update (warm start), which has no DMD losses
    assert list(generator["phase"].unique()) == ["phase 1", "phase 2"] and len(fake) == 2
    grid = Image.open(manager.get(1).folder / "samples" / "latest.png")
    assert sample.size == (grid.width * (192 // grid.height), 192 // grid.height * grid.height)
    assert '"finished": true' in log
    assert command == f"```bash\n{jobs.display_command(manager.get(1))}\n```"
    assert [row[3] for row in table] == ["stopped", "finished"]
    assert zipfile.ZipFile(download["value"]).namelist()
    assert str(manager.get(1).student) in [value for _, value in students.picker_choices()]

    finished_signal = train.on_poll(manager, 1, {"finished": []})[11]
    assert not skipped(finished_signal)  # a job just finished: Compare's picker re-lists its students
    assert skipped(train.on_poll(manager, 1, seen)[11])

    # a metrics line that is valid JSON without the loss keys (or garbage) never breaks a poll of the job
    with open(manager.get(1).run.metrics_file, "a") as metrics:
        metrics.write('{"step": 99999999, "phase": 7}\n{"step": "x"}\nnot json\n')
    progress, generator, *_ = train.on_poll(manager, 1, {})
    assert "#1 first" in progress and len(generator) == 2  # the row without a loss is left out of the plot

    # retrain its phase 2: the finished job's student is offered, and the job keeps its phase 1
    first = str(manager.get(1).student.resolve())
    assert first in [value for _, value in train_retrain.retrain_choices(manager)]
    assert train_retrain.on_student(manager, first)["choices"] == [2]
    text, picker = train.on_retrain(manager, OPEN, None, "again", 1, first, 2, *fields(**tiny))
    assert "phases before 2 kept from first" in text and picker["value"] == 3
    assert f"--from-student {first} --start-phase 2" in jobs.display_command(manager.get(3))
    again = poll_until(manager, 3, lambda j: j.status == jobs.FINISHED)[0]
    assert "again</b> — finished · step 4/4" in again and "phases before 2 kept from first" in again
    kept = Manifest.read(manager.get(3).student).phases_from
    assert kept["phases"] == [1] and kept["student"] == first


def shipped(name: str = "phased") -> tuple[str, Manifest]:
    folder = SHIPPED_STUDENTS.resolve() / name
    return str(folder), Manifest.read(folder)


def fitting(manifest: Manifest, **changes) -> list:
    """The form set to train on from ``manifest``'s student: its schedule, LoRA and teacher."""
    schedule = manifest.schedule
    form = dict(schedule_source=train_form.EDIT_HERE, boundaries=", ".join(map(str, schedule.boundaries)),
                schedule_steps=", ".join(map(str, schedule.steps)), shift=str(schedule.shift),
                rank=manifest.lora.rank, alpha=manifest.lora.alpha, teacher=manifest.teacher)
    return fields(**{**form, **changes})


def test_retrain_refuses_unserved_students_bad_phases_and_misfits_with_one_line(manager, tmp_path):
    folder, manifest = shipped()
    phases = manifest.schedule.num_phases
    copied = tmp_path / "copy"
    shutil.copytree(folder, copied)  # a valid student, but not one the app serves
    single, _ = shipped("dmd")
    refused = [
        (str(copied), 2, "not one this app serves"),
        ("/etc", 2, "not one this app serves"),
        (None, 2, "pick the student to retrain from"),
        (None, None, "pick the student to retrain from"),  # nothing picked: no job at all, not a full run
        (["a list"], 2, "pick the student to retrain from"),
        (folder, 1, f"must be a whole number from 2 to {phases}"),
        (folder, phases + 1, f"must be a whole number from 2 to {phases}"),
        (folder, 1.5, "must be a whole number"),
        (folder, "two", "must be a whole number"),
        (folder, None, "must be a whole number"),
        (folder, float("nan"), "must be a whole number"),
        (single, 2, "has one phase: there is no earlier expert to keep"),
    ]
    for student, start_phase, message in refused:
        text, picker = train.on_retrain(manager, OPEN, None, "", 1, student, start_phase, *fitting(manifest))
        assert "pdmd-error" in text and message in text and text.count("\n") == 0, (student, start_phase, text)
        assert str(tmp_path) not in text and skipped(picker)
    misfits = [
        (fitting(manifest, rank=manifest.lora.rank + 1), "its LoRA (rank"),
        (fitting(manifest, boundaries="0.3"), "its phase 1 does not sample the timesteps"),
    ]
    for form, message in misfits:
        text, _ = train.on_retrain(manager, OPEN, None, "", 1, folder, 2, *form)
        assert "pdmd-error" in text and "cannot retrain from phased" in text and message in text
    assert "wrong or missing training token" in train.on_retrain(manager, LOCKED, "x", "", 1, folder, 2,
                                                                 *fitting(manifest))[0]
    assert manager.jobs() == [] and not [p for p in manager.root.iterdir() if p.is_dir()]
    assert train_retrain.on_student(manager, str(copied))["choices"] == []
    assert train_retrain.on_student(manager, folder)["choices"] == list(range(2, phases + 1))
    assert single not in [value for _, value in train_retrain.retrain_choices(manager)]


def finished_run(root, name: str, probes: str | None) -> RunFolder:
    """A finished run folder written by hand (the jobs table is rebuilt from it): no trainer process."""
    run = RunFolder(root / name)
    run.path.mkdir(parents=True)
    config = TrainConfig.from_dict(train_form.form_config(*fields(**TWO_PHASES, updates_per_phase="2")))
    run.config_file.write_text(yaml.safe_dump(config.as_dict()))
    run.metrics_file.write_text("".join(f'{{"step": {k}, "phase": {1 + (k > 2)}, "loss_generator": 1.0}}\n'
                                        for k in range(1, 5)))
    run.write_status("finished", 4)
    if probes is not None:
        run.probe_file.write_text(probes)
    return run


def test_the_probe_curve_and_its_latest_figures(tmp_path, monkeypatch):
    monkeypatch.setenv("PDMD_RUNS_DIR", str(tmp_path / "runs"))
    root = tmp_path / "runs" / "jobs"
    rows = [{"step": 2, "seconds": 30.0, "adherence": 0.5, "fd": 20.0, "diversity": 0.1, "position_spread": 0.2,
             "size_spread": 0.3},
            {"step": 4, "seconds": 280.4, "adherence": 0.931, "fd": 9.14, "diversity": 0.1,
             "position_spread": 0.2, "size_spread": 0.3}]
    finished_run(root, "probed", "".join(json.dumps(r) + "\n" for r in rows) + '{"step": 6, "seconds"')
    finished_run(root, "empty", "")
    finished_run(root, "missing", None)
    manager = JobManager(device="cpu")  # rebuilds its table from the three folders
    by_name = {job.name: job.id for job in manager.jobs()}

    progress, _, _, adherence, fd, *_ = train.on_poll(manager, by_name["probed"], {})
    assert "probe at step 4 (4 min 40 s): adherence 0.93, FD 9.1" in progress
    assert adherence["visible"] and fd["visible"]
    assert adherence["value"]["seconds"].tolist() == [30.0, 280.4] and fd["value"]["fd"].tolist() == [20.0, 9.14]
    for name in ("empty", "missing"):
        progress, _, _, adherence, fd, *_ = train.on_poll(manager, by_name[name], {})
        assert "probe" not in progress and "finished · step 4/4" in progress
        assert not adherence["visible"] and not fd["visible"] and adherence["value"].empty


def test_the_app_builds_with_the_train_tab(manager):
    app = build_app(manager=manager, gate=OPEN)
    ids = {getattr(block, "elem_id", None) for block in app.blocks.values()}
    assert {"train-start", "train-stop", "train-progress", "train-jobs", "compare-student", "train-retrain",
            "train-retrain-student", "train-retrain-phase", "train-adherence", "train-fd"} <= ids
    # both teacher boxes offer every family's shipped checkpoints, image-to-video ones too (Compare takes an image,
    # the Train tab condition images), each of a pipeline a teacher adapter takes
    by_id = {block.elem_id: block for block in app.blocks.values() if getattr(block, "elem_id", None)}
    for box in ("train-teacher", "compare-teacher"):
        offered = [value for _, value in by_id[box].choices]
        assert set(shipped_checkpoints()) <= set(offered) and "builtin" in offered
        assert "Wan-AI/Wan2.1-I2V-14B-480P-Diffusers" in offered
    for checkpoint in shipped_checkpoints():
        index, _ = read_model_index(str(config_folder(checkpoint)))
        assert index["_class_name"] in PIPELINES
        assert index["_class_name"].removesuffix("Pipeline") in by_id["train-teacher"].info
    assert {"ZImage", "Flux2", "Flux2Klein", "HunyuanVideo15", "QwenImage21"} <= set(
        supported_pipelines().split(", "))
    manager.stop_supervisor()
