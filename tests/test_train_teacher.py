import torch
from safetensors.torch import load_file

from pdmd.checkpoints import list_checkpoints
from pdmd.cli import main
from pdmd.teachers.builtin import load_builtin_teacher


def train(folder, steps, resume=False):
    threads = torch.get_num_threads()  # --threads sets a process-wide value; leave other tests theirs
    arguments = ["train-teacher", "--out", str(folder / "teacher"), "--run-dir", str(folder / "run"),
                 "--steps", str(steps), "--batch", "2", "--checkpoint-every", "1", "--threads", "1"]
    try:
        assert main(arguments + (["--resume", "latest"] if resume else [])) == 0
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
