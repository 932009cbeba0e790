"""The LoRA phased-distillation trainer on the built-in teacher, with tiny configs."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from pdmd.cli import main
from pdmd.commands import bench_train
from pdmd.students import StudentError
from pdmd.students.folder import load_student
from pdmd.students.roles import FAKE
from pdmd.teachers import load_teacher
from pdmd.training import checkpoints
from pdmd.training.config import ConfigError, TrainConfig
from pdmd.training.run_folder import CHECKPOINT_DIR, CONTROL_FILE, METRICS_FILE, RunFolder
from pdmd.training.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def fresh_accelerator_state():
    """accelerate keeps one process-wide state; each test's Trainer may ask for other settings (bf16)."""
    from accelerate.state import AcceleratorState

    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def tiny(tmp_path, **overrides) -> dict:
    config = dict(teacher="builtin", method="phased", schedule={"boundaries": [0.5], "steps": [1, 1]},
                  updates_per_phase=2, batch_size=1, fake_ratio=1, lora={"rank": 2, "alpha": 2},
                  sample_every=100, checkpoint_every=1, keep_checkpoints=10, output_dir=str(tmp_path / "run"),
                  sample_prompts=["a red circle", "a blue star"])
    config.update(overrides)
    return config


def write(tmp_path, config: dict, name="config.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(config))
    return path


def adapters(run_dir: Path) -> dict:
    return load_file(str(checkpoints.list_checkpoints(run_dir / CHECKPOINT_DIR)[-1] / "state.safetensors"))


def test_roles_share_one_base_and_start_equal_to_the_teacher():
    from pdmd.students.manifest import LoraSpec
    from pdmd.students.roles import Roles

    teacher = load_teacher("builtin")
    base_params = sum(p.numel() for p in teacher.model.parameters())
    roles = Roles(teacher, ["phase_1", "phase_2", FAKE], LoraSpec(rank=4, alpha=4))
    lora_params = sum(p.numel() for n, p in teacher.model.named_parameters() if "lora_" in n)
    assert lora_params < 0.2 * base_params  # one base plus small adapters
    x = teacher.noise(2, seed=0)
    t = torch.full((2,), 0.7)
    cond, _ = teacher.encode_prompts(["a red circle", "a blue star"])
    with torch.no_grad():
        v_teacher = roles.velocity(None)(x, t, cond)
        torch.testing.assert_close(roles.velocity("phase_1")(x, t, cond), v_teacher)  # LoRA B = 0
        for p in roles.parameters_of("phase_2"):
            p.add_(0.05)
        assert not torch.allclose(roles.velocity("phase_2")(x, t, cond), v_teacher)
        torch.testing.assert_close(roles.velocity(None)(x, t, cond), v_teacher)  # disabled = the teacher
        torch.testing.assert_close(roles.velocity("phase_1")(x, t, cond), v_teacher)


def test_folded_experts_match_the_adapters_and_leave_the_base_exact():
    """Inference swaps in each phase's merged weights; the LoRA path, the teacher and training see no trace."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    from pdmd.students.manifest import LoraSpec
    from pdmd.students.roles import Roles

    teacher = load_teacher("builtin")
    roles = Roles(teacher, ["phase_1", "phase_2"], LoraSpec(rank=4, alpha=4))
    with torch.no_grad():
        for k, name in enumerate(roles.adapters):
            for p in roles.parameters_of(name):
                p.normal_(std=0.05 * (k + 1))
    base = {n: p.clone() for n, p in teacher.model.named_parameters() if "lora_" not in n}
    x, t = teacher.noise(2, seed=0), torch.full((2,), 0.6)
    cond, _ = teacher.encode_prompts(["a red circle", "a blue star"])
    with torch.no_grad():
        expected = {name: roles.velocity(name)(x, t, cond) for name in roles.adapters}
        v_teacher = roles.velocity(None)(x, t, cond)
        for _ in range(3):  # phase switches in both directions, as consecutive samples make them
            for name in roles.adapters:
                torch.testing.assert_close(roles.folded_velocity(name)(x, t, cond), expected[name],
                                           rtol=1e-4, atol=1e-5)
        assert not torch.allclose(expected["phase_1"], expected["phase_2"])
        assert not any(isinstance(m, BaseTunerLayer) for m in teacher.model.modules())  # the plain network runs
        torch.testing.assert_close(roles.velocity(None)(x, t, cond), v_teacher, rtol=0, atol=0)
        roles.folded_velocity("phase_1")(x, t, cond)
        for p in roles.parameters_of("phase_1"):  # new weights: the merged copy is rebuilt, not reused
            p.mul_(-1)
        roles.load_state_dict("phase_1", roles.state_dict("phase_1"))
        torch.testing.assert_close(roles.folded_velocity("phase_1")(x, t, cond), roles.velocity("phase_1")(x, t, cond),
                                   rtol=1e-4, atol=1e-5)
    roles._activate(None)
    assert teacher.model.dtype == torch.float32 and type(teacher.model).__name__ == "UNet2DModel"
    assert sum(isinstance(m, BaseTunerLayer) for m in teacher.model.modules()) == len(roles.layers)
    assert all(torch.equal(p, base[n]) for n, p in teacher.model.named_parameters() if "lora_" not in n)


def test_training_writes_metrics_samples_checkpoints_and_a_loadable_student(tmp_path):
    config = TrainConfig.from_dict(tiny(tmp_path, sample_every=2))
    result = Trainer(config).fit(progress=False)
    run = Path(config.output_dir)
    assert result["finished"] and result["step"] == 4
    rows = [json.loads(line) for line in (run / METRICS_FILE).read_text().splitlines()]
    assert [r["phase"] for r in rows] == [1, 1, 2, 2]
    assert {"loss_generator", "loss_fake", "grad_norm", "dmd_gradient_norm", "score_gap", "it_per_s",
            "memory_mb"} <= set(rows[0])
    assert all(r["dmd_gradient_norm"] > 0 and r["score_gap"] >= 0 for r in rows)
    assert (run / "samples" / "step-000002.png").is_file() and (run / "samples" / "latest.png").is_file()
    assert len(checkpoints.list_checkpoints(run / CHECKPOINT_DIR)) == 4

    manifest = json.loads((run / "student" / "manifest.json").read_text())
    assert manifest["teacher"] == "builtin" and manifest["method"] == "phased"
    assert manifest["schedule"] == {"boundaries": [0.5], "steps": [1, 1], "shift": 1.0}
    assert manifest["updates_trained"] == 4 and manifest["student_cfg"] == 1.0
    weights = load_file(str(run / "student" / manifest["phases"][0]))
    assert all(k.startswith("unet.") and (".lora_A." in k or ".lora_B." in k) for k in weights)

    student = load_student(run / "student", load_teacher("builtin"))
    out = student.sample(["a red circle"], seed=0)
    assert out.nfe == 2 and out.sample.shape == (1, *student.roles.teacher.latent_shape)
    # the trained phase-1 expert differs from the teacher: LoRA B left zero would mean nothing was learned
    assert any(v.abs().sum() > 0 for k, v in weights.items() if "lora_B" in k)


def test_resume_matches_an_uninterrupted_run(tmp_path):
    straight = tiny(tmp_path / "a")
    Trainer(TrainConfig.from_dict(straight)).fit(progress=False)
    reference = adapters(Path(straight["output_dir"]))

    for stop in (1, 2):  # inside phase 1, and exactly at the phase boundary
        broken = tiny(tmp_path / f"b{stop}")
        Trainer(TrainConfig.from_dict(broken)).fit(max_steps=stop, progress=False)
        resumed = Trainer(TrainConfig.from_dict(broken))
        assert resumed.resume("latest") is not None
        assert resumed.step == stop
        resumed.fit(progress=False)
        state = adapters(Path(broken["output_dir"]))
        assert state.keys() == reference.keys()
        for key in reference:
            torch.testing.assert_close(state[key], reference[key], rtol=1e-5, atol=1e-6, msg=key)


def test_a_regression_warm_start_opens_every_phase_and_resumes_like_an_unbroken_run(tmp_path):
    warm = dict(updates_per_phase=3, regression_updates=2, regression_pairs=4, regression_teacher_steps=2)
    # at most half of a 3-update phase is warm start: one regression update, then two DMD updates
    assert TrainConfig.from_dict(tiny(tmp_path, **warm)).warm_start_updates(0) == 1
    straight = tiny(tmp_path / "a", **warm)
    Trainer(TrainConfig.from_dict(straight)).fit(progress=False)
    rows = [json.loads(line) for line in RunFolder(straight["output_dir"]).metrics_file.read_text().splitlines()]
    assert [("loss_regression" in row, "loss_fake" in row) for row in rows] == [(True, False)] + [
        (False, True)] * 2 + [(True, False)] + [(False, True)] * 2
    reference = adapters(Path(straight["output_dir"]))

    broken = tiny(tmp_path / "b", **warm)
    Trainer(TrainConfig.from_dict(broken)).fit(max_steps=1, progress=False)  # the pairs are solved again
    resumed = Trainer(TrainConfig.from_dict(broken))
    assert resumed.resume("latest") is not None
    resumed.fit(progress=False)
    state = adapters(Path(broken["output_dir"]))
    for key in reference:
        torch.testing.assert_close(state[key], reference[key], rtol=1e-5, atol=1e-6, msg=key)
    with pytest.raises(ConfigError, match="regression_pairs = 5000 must be at most 1024"):
        TrainConfig.from_dict(tiny(tmp_path, **{**warm, "regression_pairs": 5000}))


def test_resume_latest_skips_a_damaged_newest_checkpoint_and_ends_as_an_unbroken_run(tmp_path, capsys):
    straight = tiny(tmp_path / "a")
    Trainer(TrainConfig.from_dict(straight)).fit(progress=False)
    broken = tiny(tmp_path / "b")
    path = write(tmp_path, broken)
    assert main(["train", "--config", str(path), "--no-progress", "--max-steps", "3"]) == 0
    newest = checkpoints.list_checkpoints(Path(broken["output_dir"]) / CHECKPOINT_DIR)[-1]
    state = newest / "state.safetensors"
    state.write_bytes(state.read_bytes()[:100])  # a full disk or a kill mid-write on a filesystem without rename
    capsys.readouterr()
    assert main(["train", "--config", str(path), "--no-progress", "--resume", "latest"]) == 0
    err = capsys.readouterr().err
    assert "step-000003" in err and "set aside as .damaged-step-000003" in err and "Traceback" not in err
    reference, state = adapters(Path(straight["output_dir"])), adapters(Path(broken["output_dir"]))
    for key in reference:  # resumed from step 2, it redid step 3 exactly
        torch.testing.assert_close(state[key], reference[key], rtol=1e-5, atol=1e-6, msg=key)


def test_a_later_phase_retrains_from_a_finished_students_earlier_experts(tmp_path, capsys):
    config = tiny(tmp_path / "a")
    assert main(["train", "--config", str(write(tmp_path, config, "a.yaml")), "--no-progress"]) == 0
    source = Path(config["output_dir"]) / "student"
    again = {**config, "output_dir": str(tmp_path / "b" / "run")}
    command = ["train", "--config", str(write(tmp_path, again, "b.yaml")), "--no-progress",
               "--from-student", str(source), "--start-phase", "2"]
    assert main(command) == 0
    retrained = Path(again["output_dir"]) / "student"
    for k in (1, 2):  # phase 1 taken as is; phase 2 trained as the unbroken run trained it
        theirs, ours = (load_file(str(f / f"phase_{k}" / "pytorch_lora_weights.safetensors")) for f in (source, retrained))
        for key in theirs:
            torch.testing.assert_close(ours[key], theirs[key], rtol=1e-5, atol=1e-6, msg=key)
    manifest = json.loads((retrained / "manifest.json").read_text())
    assert manifest["phases_from"] == {"student": str(source), "phases": [1]} and manifest["updates_trained"] == 4
    rows = [json.loads(line) for line in (Path(again["output_dir"]) / METRICS_FILE).read_text().splitlines()]
    assert [r["phase"] for r in rows] == [2, 2]

    capsys.readouterr()
    moved = {**again, "schedule": {"boundaries": [0.6], "steps": [1, 1]}, "output_dir": str(tmp_path / "c")}
    assert main([*command[:2], str(write(tmp_path, moved, "c.yaml")), *command[3:]]) == 2
    assert "its phase 1 does not sample the timesteps of this config's phase 1" in capsys.readouterr().err
    assert main([*command[:4], "--start-phase", "2"]) == 2
    assert "--from-student and --start-phase go together" in capsys.readouterr().err
    assert main([*command[:-1], "1"]) == 2
    assert "phase 1 has no earlier expert to keep" in capsys.readouterr().err


def test_control_file_stops_gracefully_with_a_checkpoint(tmp_path):
    config = TrainConfig.from_dict(tiny(tmp_path, checkpoint_every=100))
    run = Path(config.output_dir)
    run.mkdir(parents=True)
    (run / CONTROL_FILE).write_text(json.dumps({"action": "stop"}))
    result = Trainer(config).fit(progress=False)
    assert result["stopped"] and not result["finished"] and result["step"] == 1
    assert checkpoints.list_checkpoints(run / CHECKPOINT_DIR)[-1].name == "step-000001"


def test_a_crash_during_a_checkpoint_write_keeps_the_previous_one(tmp_path, monkeypatch):
    run_dir = tmp_path / "checkpoints"
    checkpoints.save_checkpoint(run_dir, 1, {"w": torch.ones(3)}, {})

    def crash(*args, **kwargs):
        raise KeyboardInterrupt("killed mid-write")

    monkeypatch.setattr(checkpoints, "save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        checkpoints.save_checkpoint(run_dir, 2, {"w": torch.zeros(3)}, {})
    latest = checkpoints.resolve_checkpoint(run_dir, "latest")
    assert latest.name == "step-000001"
    tensors, meta = checkpoints.load_checkpoint(latest)
    assert meta["step"] == 1 and tensors["w"].sum() == 3


def test_a_diverging_update_stops_the_run_before_it_spoils_adapters_or_checkpoints(tmp_path, monkeypatch, capsys):
    from pdmd.core import distill

    real_loss = distill.generator_loss
    calls = []

    def nan_at_the_third_step(*args, **kwargs):
        calls.append(1)
        loss, diagnostics = real_loss(*args, **kwargs)
        return (loss * float("nan") if len(calls) == 3 else loss), diagnostics

    monkeypatch.setattr(distill, "generator_loss", nan_at_the_third_step)
    config = tiny(tmp_path)
    assert main(["train", "--config", str(write(tmp_path, config)), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "generator update of step 3 (phase 2) diverged" in err and "Lower lr_generator" in err
    assert "Traceback" not in err
    run = Path(config["output_dir"])
    status = json.loads((run / "status.json").read_text())
    assert status["state"] == "failed" and "diverged" in status["error"]
    assert checkpoints.list_checkpoints(run / CHECKPOINT_DIR)[-1].name == "step-000002"
    assert all(torch.isfinite(v).all() for v in adapters(run).values())
    assert not (run / "student").exists()


@pytest.mark.parametrize("override, message", [
    ({"method": "gan"}, "method = 'gan' is unknown"),
    ({"schedule": {"boundaries": [0.3, 0.6], "steps": 1}}, "schedule: boundary 0.6 follows 0.3"),
    ({"updates_per_phase": [2, 2, 2]}, "updates_per_phase [2, 2, 2] does not fit the schedule's 2 phases"),
    ({"method": "dmd-sgts"}, "schedule has 2 phases but method 'dmd-sgts' is single-phase"),
    ({"lr_generator": 0}, "lr_generator = 0 must be greater than 0"),
    ({"lr_fake": -1e-4}, "lr_fake = -0.0001 must be greater than 0"),
    ({"batch_size": "eight"}, "batch_size = 'eight' must be a number"),
    ({"teacher": ""}, "teacher is missing"),
    ({"learning_rate": 1e-4}, "unknown config field(s) ['learning_rate']"),
])
def test_invalid_config_fails_before_any_work_naming_the_field(tmp_path, override, message, capsys):
    config = tiny(tmp_path, **override)
    with pytest.raises(ConfigError) as err:
        TrainConfig.from_dict(config)
    assert message in str(err.value)
    assert main(["train", "--config", str(write(tmp_path, config))]) == 2
    assert message in capsys.readouterr().err
    assert not Path(config["output_dir"]).exists()


def test_unknown_teacher_and_missing_config_are_named(tmp_path, capsys):
    assert main(["train", "--config", str(write(tmp_path, tiny(tmp_path, teacher="sdxl-nope")))]) == 2
    assert "unknown teacher 'sdxl-nope'" in capsys.readouterr().err
    assert main(["train", "--config", str(tmp_path / "nope.yaml")]) == 2
    assert "nope.yaml does not exist" in capsys.readouterr().err


def _student(tmp_path) -> Path:
    config = tiny(tmp_path, updates_per_phase=1)
    Trainer(TrainConfig.from_dict(config)).fit(progress=False)
    return Path(config["output_dir"]) / "student"


def test_bad_student_folders_are_refused_with_the_reason(tmp_path):
    folder = _student(tmp_path)
    teacher = load_teacher("builtin")
    (folder / "extra.bin").write_bytes(b"not really a pickle")
    with pytest.raises(StudentError, match=r"pickle files \['extra.bin'\]"):
        load_student(folder, teacher)
    (folder / "extra.bin").unlink()
    weights = folder / "phase_1" / "pytorch_lora_weights.safetensors"
    state = load_file(str(weights))
    save_file({**state, "unet.no_such_block.conv.lora_A.weight": torch.zeros(2, 2)}, str(weights))
    with pytest.raises(StudentError, match="phase 1 .*LoRA keys match no module of the teacher: .*no_such_block"):
        load_student(folder, load_teacher("builtin"))
    key = next(k for k in state if k.endswith("lora_A.weight"))  # a LoRA of another network: one layer differs
    save_file({**state, key: torch.zeros(state[key].shape[0], state[key].shape[1] + 8, *state[key].shape[2:])},
              str(weights))
    with pytest.raises(StudentError, match=r"phase 1 \(phase_1/pytorch_lora_weights.safetensors\): 1 of \d+ LoRA "
                                           r"weights do not fit the teacher's layers .*distil it again"):
        load_student(folder, load_teacher("builtin"))
    save_file(state, str(weights))
    (folder / "manifest.json").unlink()
    with pytest.raises(StudentError, match="manifest.json is missing"):
        load_student(folder, load_teacher("builtin"))


def test_sample_command_renders_teacher_and_student(tmp_path, capsys):
    folder = _student(tmp_path)
    out = tmp_path / "student.png"
    assert main(["sample", "--student", str(folder), "--prompt", "a red circle", "--seed", "0",
                 "--out", str(out)]) == 0
    assert json.loads(capsys.readouterr().out)["nfe"] == 2 and out.read_bytes()[:4] == b"\x89PNG"
    assert main(["sample", "--prompt", "a red circle", "--steps", "2", "--out", str(tmp_path / "t.png")]) == 0
    assert json.loads(capsys.readouterr().out)["nfe"] == 4  # 2 steps with CFG
    assert main(["sample", "--student", str(tmp_path / "none"), "--prompt", "x", "--out", str(out)]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_accelerate_launch_two_processes_keeps_ranks_identical(tmp_path):
    config = tiny(tmp_path, method="dmd", schedule={"steps": 1}, updates_per_phase=8, batch_size=4, fake_ratio=3,
                  lr_fake=1e-3, checkpoint_every=100)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                           "-m", "pdmd", "train", "--config", str(write(tmp_path, config)), "--no-progress"],
                          capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = Path(config["output_dir"])
    ranks = [json.loads((run / f"rank-{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["step"] == ranks[1]["step"] == 8
    assert ranks[0]["adapters_sha256"] == ranks[1]["adapters_sha256"]
    rows = [json.loads(line) for line in (run / METRICS_FILE).read_text().splitlines()]
    assert len(rows) == 8  # only the main process logs
    # the fake score fits the generator's samples: its loss falls from the teacher-initialised start
    first, last = sum(r["loss_fake"] for r in rows[:3]), sum(r["loss_fake"] for r in rows[-3:])
    assert last < 0.9 * first


def test_eval_command_measures_a_student_with_the_teachers_keys(tmp_path, capsys):
    folder = _student(tmp_path)
    assert main(["eval", "--student", str(folder), "--prompts", "2", "--per-prompt", "2", "--json"]) == 0
    row = json.loads(capsys.readouterr().out)
    assert {"adherence", "diversity", "fd", "nfe", "seconds", "images"} <= set(row)
    assert row["nfe"] == 2 and row["images"] == 4  # a 2-phase x 1-step student, no CFG
    (folder / "manifest.json").unlink()
    assert main(["eval", "--student", str(folder), "--json"]) == 2
    assert "manifest.json is missing" in capsys.readouterr().err


def test_teacher_guidance_defaults_to_the_teachers_own(tmp_path):
    trainer = Trainer(TrainConfig.from_dict(tiny(tmp_path, updates_per_phase=1)))
    assert trainer.teacher_cfg == trainer.teacher.default_cfg
    explicit = Trainer(TrainConfig.from_dict(tiny(tmp_path, teacher_cfg=2.5)))
    assert explicit.teacher_cfg == 2.5
    with pytest.raises(ConfigError, match="teacher_cfg = -1 must be at least 0"):
        TrainConfig.from_dict(tiny(tmp_path, teacher_cfg=-1))


def test_tensorboard_logging_through_accelerate(tmp_path):
    config = TrainConfig.from_dict(tiny(tmp_path, updates_per_phase=1, report_to="tensorboard"))
    Trainer(config).fit(progress=False)
    events = list(Path(config.output_dir).rglob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0


def test_gradient_checkpointing_trains_the_same_adapters(tmp_path):
    plain = tiny(tmp_path / "plain", updates_per_phase=1)
    Trainer(TrainConfig.from_dict(plain)).fit(progress=False)
    a = adapters(Path(plain["output_dir"]))
    for mode in (True, "rollout"):  # everywhere, or only in the generator's multi-step rollout
        checkpointed = tiny(tmp_path / f"ckpt-{mode}", updates_per_phase=1, gradient_checkpointing=mode)
        trainer = Trainer(TrainConfig.from_dict(checkpointed))
        assert trainer.teacher.model.is_gradient_checkpointing == (mode is True)
        trainer.fit(progress=False)
        assert trainer.teacher.model.is_gradient_checkpointing == (mode is True)  # "rollout" switches it back off
        b = adapters(Path(checkpointed["output_dir"]))
        for key in a:
            if key.startswith("adapter/"):
                torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-6, msg=f"{mode}: {key}")
    with pytest.raises(ConfigError, match="gradient_checkpointing = 'fake' must be true, false or 'rollout'"):
        TrainConfig.from_dict(tiny(tmp_path, gradient_checkpointing="fake"))


def test_probe_every_writes_the_curve_and_leaves_training_unchanged(tmp_path):
    probed = tiny(tmp_path, updates_per_phase=[2, 1], probe_every=2, probe_per_prompt=1, ema_decay=0.5,
                  checkpoint_every=3)
    plain = tiny(tmp_path, updates_per_phase=[2, 1], ema_decay=0.5, checkpoint_every=3,
                 output_dir=str(tmp_path / "plain"))
    Trainer(TrainConfig.from_dict(probed)).fit(progress=False)
    Trainer(TrainConfig.from_dict(plain)).fit(progress=False)
    rows = RunFolder(probed["output_dir"]).probes()
    assert [row["step"] for row in rows] == [2, 3]  # every 2 updates, and at the end
    assert all(0 <= row["adherence"] <= 1 and row["fd"] > 0 and row["seconds"] > 0 for row in rows)
    assert rows[1]["seconds"] > rows[0]["seconds"]
    a, b = adapters(Path(probed["output_dir"])), adapters(Path(plain["output_dir"]))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # measuring draws no training randomness
    with pytest.raises(ConfigError, match="probe_every measures with the built-in teacher's probe"):
        TrainConfig.from_dict(tiny(tmp_path, teacher="tiny-sd3", probe_every=5))
    with pytest.raises(ConfigError, match="probe_per_prompt = 100 must be at most 64"):
        TrainConfig.from_dict(tiny(tmp_path, probe_per_prompt=100))


def test_linear_lr_decay_anneals_the_generator_to_zero_in_every_phase(tmp_path):
    config = tiny(tmp_path, updates_per_phase=[2, 4], lr_generator=1e-3, lr_decay="linear")
    Trainer(TrainConfig.from_dict(config)).fit(progress=False)
    rows = [json.loads(line) for line in RunFolder(config["output_dir"]).metrics_file.read_text().splitlines()]
    assert [row["lr_generator"] for row in rows] == pytest.approx([1e-3, 5e-4, 1e-3, 7.5e-4, 5e-4, 2.5e-4])
    with pytest.raises(ConfigError, match="lr_decay = 'cosine' must be 'constant' or 'linear'"):
        TrainConfig.from_dict(tiny(tmp_path, lr_decay="cosine"))


def test_bf16_mixed_precision_trains_on_cpu(tmp_path):
    config = TrainConfig.from_dict(tiny(tmp_path, updates_per_phase=1, mixed_precision="bf16"))
    trainer = Trainer(config)
    assert trainer.accelerator.mixed_precision == "bf16"
    result = trainer.fit(progress=False)
    rows = [json.loads(line) for line in (Path(config.output_dir) / METRICS_FILE).read_text().splitlines()]
    assert result["finished"] and all(torch.isfinite(torch.tensor(r["loss_generator"])) for r in rows)


def test_bench_train_times_every_phase_and_estimates_the_run(tmp_path, capsys):
    config = write(tmp_path, tiny(tmp_path, updates_per_phase=[3, 5]))
    assert main(["bench-train", "--config", str(config), "--steps", "1", "--threads", "1"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    per_phase = report["seconds_per_generator_step"]
    assert len(per_phase) == 2 and all(seconds > 0 for seconds in per_phase)
    assert report["estimated_training_minutes"] == pytest.approx((3 * per_phase[0] + 5 * per_phase[1]) / 60, abs=0.06)
    assert report["train_peak_mb"] > 0 and report["memory_ratio"] == pytest.approx(
        report["train_peak_mb"] / report["teacher_inference_peak_mb"], abs=1e-3)
    assert main(["bench-train", "--config", str(config), "--steps", "3"]) == 2  # 3 + warm-up > phase 1's 3 steps
    assert "more than the shortest phase" in capsys.readouterr().err


def test_bench_train_profile_labels_every_part_of_an_update(tmp_path, capsys):
    config = write(tmp_path, tiny(tmp_path, updates_per_phase=[4, 4], ema_decay=0.9))
    assert main(["bench-train", "--config", str(config), "--steps", "1", "--threads", "1", "--profile", "--json"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert [p["phase"] for p in report["phases"]] == [1, 2]
    for phase in report["phases"]:
        assert all(phase["parts_ms"][label] > 0 for label in bench_train.LABELS), phase["parts_ms"]
        assert sum(phase["parts_ms"].values()) < 1000 * phase["seconds_per_update"] * 3  # profiler overhead bounded
        assert phase["flops_per_update"] > 0
    assert report["phases"][1]["flops_per_update"] > report["phases"][0]["flops_per_update"]  # phase 2 rolls out more
    assert report["matmul_flops_per_second"] > 1e8 and report["checkpoint_ms_per_update"] > 0
    assert main(["bench-train", "--config", str(config), "--steps", "2", "--profile"]) == 2  # 2 x 2 + 2 > 4


@pytest.mark.parametrize("path", sorted(p.relative_to(ROOT).as_posix() for p in
                                        [*ROOT.glob("assets/students/*/config.yaml"), *ROOT.glob("configs/*.yaml")]))
def test_every_shipped_config_is_valid(path):
    config = TrainConfig.from_yaml(ROOT / path)
    assert config.total_updates > 0 and len(config.updates_per_phase) == config.schedule.num_phases


def test_old_config_keys_still_load_with_one_deprecation_line(tmp_path):
    old = tiny(tmp_path, timestep_shift=2.0)
    old["steps_per_phase"] = old.pop("updates_per_phase")
    with pytest.warns(FutureWarning, match="config keys") as caught:
        config = TrainConfig.from_dict(old)
    assert len(caught) == 1 and config.updates_per_phase == (2, 2) and config.renoise_shift == 2.0
    with pytest.raises(ConfigError, match="same field: keep updates_per_phase"):
        TrainConfig.from_dict({**tiny(tmp_path), "steps_per_phase": 3})
