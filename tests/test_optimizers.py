"""The 8-bit optimizer option: torchao's AdamW8bit, its states saved in our safetensors checkpoints and resumed."""
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pdmd.training import checkpoints
from pdmd.training.config import ConfigError, TrainConfig
from pdmd.training.optimizers import build_optimizer, load_optimizer_tensors, optimizer_tensors
from pdmd.training.run_folder import CHECKPOINT_DIR, RunFolder
from pdmd.training.trainer import Trainer


@pytest.fixture(autouse=True)
def fresh_accelerator_state():
    from accelerate.state import AcceleratorState
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def config(folder: Path) -> dict:
    # rank 16: the built-in UNet's LoRA matrices reach 4096 values, the size AdamW8bit starts quantizing at;
    # lr_decay linear: torchao keeps the rate a tensor, which the decay must fill in place
    return dict(teacher="builtin", optimizer="adamw8bit", lr_decay="linear", lr_generator=1e-3, schedule={"boundaries": [0.5], "steps": [1, 1]},
                updates_per_phase=2, batch_size=2, fake_ratio=1, lora={"rank": 16, "alpha": 16},
                sample_every=100, checkpoint_every=1, keep_checkpoints=10, output_dir=str(folder / "run"))


def adapters(run: Path) -> dict:
    return {k: v for k, v in load_file(str(checkpoints.list_checkpoints(run / CHECKPOINT_DIR)[-1] /
                                              "state.safetensors")).items() if not k.startswith("optimizer/")}


def test_8bit_states_round_trip_exactly():
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(16, 512)), torch.nn.Parameter(torch.randn(16))]
    optimizer = build_optimizer("adamw8bit", params, lr=1e-2, weight_decay=0.0)
    for _ in range(2):
        for p in params:
            p.grad = torch.randn_like(p)
        optimizer.step()
    assert type(optimizer.state[params[0]]["exp_avg"]).__name__ == "OptimState8bit"  # 8-bit, not float
    saved = optimizer_tensors(optimizer)
    assert saved["0.exp_avg.codes"].dtype == torch.uint8 and "1.exp_avg" in saved  # small tensors stay float

    copies = [torch.nn.Parameter(p.detach().clone()) for p in params]
    restored = build_optimizer("adamw8bit", copies, lr=1e-2, weight_decay=0.0)
    load_optimizer_tensors(restored, saved)
    for name, tensor in optimizer_tensors(restored).items():
        assert torch.equal(tensor, saved[name]), name
    for p, q in zip(params, copies):
        p.grad = q.grad = torch.ones_like(p)
    optimizer.step()
    restored.step()
    for p, q in zip(params, copies):
        assert torch.equal(p, q)


def test_a_resumed_adamw8bit_run_matches_an_uninterrupted_one(tmp_path):
    straight = config(tmp_path / "a")
    Trainer(TrainConfig.from_dict(straight)).fit(progress=False)
    reference = adapters(Path(straight["output_dir"]))
    rows = [json.loads(line) for line in RunFolder(straight["output_dir"]).metrics_file.read_text().splitlines()]
    assert [row["lr_generator"] for row in rows] == pytest.approx([1e-3, 5e-4, 1e-3, 5e-4])

    broken = config(tmp_path / "b")
    Trainer(TrainConfig.from_dict(broken)).fit(max_steps=1, progress=False)  # inside phase 1: states matter
    first = checkpoints.list_checkpoints(Path(broken["output_dir"]) / CHECKPOINT_DIR)[0]
    assert any(k.endswith(".codes") for k in load_file(str(first / "state.safetensors")))
    resumed = Trainer(TrainConfig.from_dict(broken))
    assert resumed.resume("latest") is not None and resumed.step == 1
    resumed.fit(progress=False)
    state = adapters(Path(broken["output_dir"]))
    assert state.keys() == reference.keys()
    for key in reference:
        assert torch.equal(state[key], reference[key]), key


def test_an_unknown_optimizer_is_refused_in_one_line():
    with pytest.raises(ConfigError, match="optimizer = 'sgd' is unknown; choose one of adamw, adamw8bit"):
        TrainConfig.from_dict({"optimizer": "sgd"})
