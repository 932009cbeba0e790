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


def test_the_byte_counter_gives_an_int8_weight_one_byte_per_value():
    from pdmd.teachers.quantize import module_bytes, quantize_module, tensor_bytes
    network = torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.Linear(512, 256)).to(torch.bfloat16)
    quantize_module(network, "int8")
    for layer in network:
        weight = layer.weight
        assert type(weight).__name__ == "Int8Tensor"
        assert weight.numel() * weight.element_size() == 2 * weight.numel()  # the bf16 face the old check counted
        # one int8 per value plus one scale per output row
        assert weight.numel() <= tensor_bytes(weight) <= 1.02 * weight.numel()
    assert module_bytes(network) < 0.55 * sum(2 * p.numel() for p in network.parameters())


def test_bitsandbytes_4bit_weights_are_counted_with_their_quantization_state():
    bnb = pytest.importorskip("bitsandbytes")
    from pdmd.teachers.quantize import nf4_bytes, tensor_bytes
    dense = torch.nn.Linear(256, 512, bias=False)
    weight = bnb.nn.Params4bit(dense.weight.data.to(torch.bfloat16), requires_grad=False, quant_type="nf4")
    weight = weight._quantize("cpu")
    counted = tensor_bytes(weight)
    assert counted == pytest.approx(nf4_bytes(dense), rel=0.02)  # the planner's nf4 estimate
    assert counted > weight.numel() * weight.element_size()      # the packed data alone


def test_the_load_check_holds_an_int8_base_to_its_real_bytes(tiny_pipeline, monkeypatch):
    """The load refused int8 runs that plan says fit: it counted torchao's weights at their bf16 face."""
    from pdmd.teachers import diffusers_base
    from pdmd.teachers.quantize import module_bytes
    teacher = load_teacher(str(tiny_pipeline("sd3")), quantize="int8")
    real = module_bytes(teacher.model)
    faced = sum(t.numel() * t.element_size() for t in (*teacher.model.parameters(), *teacher.model.buffers()))
    assert real < 0.6 * faced
    monkeypatch.setattr(torch.nn.Module, "to", lambda self, *args, **kwargs: self)  # only the check runs
    monkeypatch.setattr(diffusers_base, "free_device_memory", lambda device: real)
    teacher._to_device([teacher.model], torch.device("meta"))  # fits: no error
    monkeypatch.setattr(diffusers_base, "free_device_memory", lambda device: real - 1)
    with pytest.raises(TeacherError, match="GiB are free"):
        teacher._to_device([teacher.model], torch.device("meta"))


def test_cuda_without_an_index_is_the_current_cuda_device(monkeypatch):
    from pdmd.teachers.diffusers_base import same_device
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    assert same_device(torch.device("cuda"), torch.device("cuda:0"))
    assert same_device(torch.device("cuda:0"), torch.device("cuda"))
    assert not same_device(torch.device("cuda"), torch.device("cuda:1"))
    assert not same_device(torch.device("cpu"), torch.device("cuda:0"))
