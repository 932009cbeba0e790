"""A quantized frozen base (torchao int8 through diffusers' PipelineQuantizationConfig) with PEFT LoRA on top."""
import pytest
import torch

from pdmd.cli import main
from pdmd.students.folder import load_student
from pdmd.teachers import TeacherError, load_teacher
from pdmd.training.config import ConfigError, TrainConfig
from pdmd.training.trainer import Trainer


@pytest.fixture(autouse=True)
def fresh_accelerator_state():
    from accelerate.state import AcceleratorState
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def test_tiny_pipeline_loads_int8_trains_saves_and_reloads_a_matching_student(tiny_pipeline, tmp_path):
    folder = str(tiny_pipeline("wan2.1"))
    sizes = dict(height=32, width=32, num_frames=5)
    config = TrainConfig.from_dict(dict(
        teacher=folder, quantize="int8", schedule={"boundaries": [0.5], "steps": [1, 1]}, updates_per_phase=1,
        batch_size=2, fake_ratio=1, lora={"rank": 4, "alpha": 4}, prompts=["a red fox", "a city at night"],
        sample_every=100, checkpoint_every=100, output_dir=str(tmp_path / "run"), **sizes))
    trainer = Trainer(config)
    base = trainer.teacher.model.blocks[0].attn1.to_q.get_base_layer().weight
    assert type(base).__name__ == "Int8Tensor"  # the frozen base really is int8
    losses = [trainer.train_step()["loss_generator"] for _ in range(2)]
    assert all(map(torch.isfinite, torch.tensor(losses)))
    student_dir = trainer.export_student()
    trained = trainer.teacher.sample(["a red fox"], seed=3, schedule=trainer.schedule, cfg=1.0,
                                     experts=trainer.experts).sample

    reloaded = load_student(student_dir, load_teacher(folder, quantize="int8", **sizes))
    again = reloaded.sample(["a red fox"], seed=3).sample
    assert torch.allclose(trained, again, atol=1e-5)
    plain = load_teacher(folder, quantize="int8", **sizes).sample(["a red fox"], seed=3, schedule=trainer.schedule,
                                                                   cfg=1.0).sample
    assert not torch.allclose(plain, again, atol=1e-4)  # the adapters did change the samples


def test_int8_base_is_smaller_and_close_to_fp32(tiny_pipeline):
    from pdmd.plan.memory import module_bytes
    folder = str(tiny_pipeline("sd3"))
    fp32, int8 = load_teacher(folder), load_teacher(folder, quantize="int8")
    assert module_bytes(int8.model) < 0.5 * module_bytes(fp32.model)
    x = fp32.noise(1, seed=0)
    cond, _ = fp32.encode_prompts(["a red fox"])
    with torch.no_grad():
        a, b = fp32.velocity(x, torch.full((1,), 0.5), cond), int8.velocity(x, torch.full((1,), 0.5), cond)
    assert (a - b).norm() / a.norm() < 0.05


def test_unknown_quantization_is_refused_in_one_line(tmp_path, capsys):
    with pytest.raises(ConfigError, match="quantize = 'int3' is unknown"):
        TrainConfig.from_dict({"quantize": "int3"})
    with pytest.raises(TeacherError, match="nf4 needs bitsandbytes and a CUDA GPU"):
        load_teacher("builtin", device="cpu", quantize="nf4")
    path = tmp_path / "config.yaml"
    path.write_text("quantize: int3\n")
    assert main(["train", "--config", str(path)]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("python -m pdmd")]
    assert len(errors) == 1 and "int3" in errors[0]
