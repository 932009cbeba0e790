import torch
from safetensors.torch import load_file

from pdmd.cli import main
from pdmd.teachers.builtin import load_builtin_teacher
from pdmd.training.checkpoints import list_checkpoints


def train(folder, steps, resume=False, arch=None):
    threads = torch.get_num_threads()  # --threads sets a process-wide value; leave other tests theirs
    arguments = ["train-teacher", "--out", str(folder / "teacher"), "--run-dir", str(folder / "run"),
                 "--steps", str(steps), "--batch", "2", "--checkpoint-every", "1", "--threads", "1"]
    try:
        assert main(arguments + (["--resume", "latest"] if resume else []) + (["--arch", arch] if arch else [])) == 0
    finally:
        torch.set_num_threads(threads)


def test_resumed_training_matches_an_uninterrupted_run_and_exports_a_loadable_teacher(tmp_path):
    train(tmp_path / "straight", 3)
    train(tmp_path / "resumed", 2)
    train(tmp_path / "resumed", 3, resume=True)

    checkpoints = list_checkpoints(tmp_path / "straight" / "run")
    assert [p.name for p in checkpoints] == ["step-000002", "step-000003"]  # older ones are pruned
    straight = load_file(str(checkpoints[-1] / "state.safetensors"))
    resumed = load_file(str(list_checkpoints(tmp_path / "resumed" / "run")[-1] / "state.safetensors"))
    assert straight.keys() == resumed.keys()
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)

    assert load_builtin_teacher(tmp_path / "resumed" / "teacher").info["trained_steps"] == 3
    assert {p.suffix for p in tmp_path.rglob("*") if p.is_file()} == {".safetensors", ".json"}  # no pickle


def test_another_architecture_trains_loads_and_keeps_its_architecture_on_resume(tmp_path):
    train(tmp_path, 1, arch="patch2-small")
    train(tmp_path, 2, resume=True, arch="pixel")  # the run's own architecture wins

    teacher = load_builtin_teacher(tmp_path / "teacher")
    assert teacher.info["architecture"] == "patch2-small" and teacher.info["trained_steps"] == 2
    assert teacher.latent_shape == (12, 16, 16)  # 2x2 patches folded into channels
    cond, _ = teacher.encode_prompts(["a red star"])
    x = torch.randn(1, *teacher.latent_shape)
    images = teacher.decode(teacher.velocity(x, torch.tensor([0.5]), cond))
    assert images.shape == (1, 3, 32, 32) and 0 <= images.min() <= images.max() <= 1


def test_a_bad_device_is_a_clear_error_before_any_work(tmp_path, capsys):
    arguments = ["train-teacher", "--out", str(tmp_path / "teacher"), "--run-dir", str(tmp_path / "run"),
                 "--steps", "1", "--device"]
    assert main(arguments + ["gpu"]) == 2
    assert "--device 'gpu'" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main(arguments + ["cuda"]) == 2
        assert "no CUDA device" in capsys.readouterr().err
    assert not (tmp_path / "run").exists() and not (tmp_path / "teacher").exists()
