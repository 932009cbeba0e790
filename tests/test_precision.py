"""Precision and device contracts of training, checked on the CPU: float32 adapters, optimizer states and EMA on a
bf16 base; a resume that puts every loaded tensor where its parameter is (the meta device standing in for CUDA);
fp16's GradScaler unscaling before the clip and skipping an overflowing update; samples drawn without the released
text encoders; the free-memory check counting the allocator's unused cache."""
import importlib.util
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pdmd.students.roles import FAKE, phase_adapter
from pdmd.teachers import diffusers_base, load_teacher
from pdmd.training import checkpoints
from pdmd.training.config import ConfigError, TrainConfig
from pdmd.training.gradients import average_gradients
from pdmd.training.optimizers import compiles_update
from pdmd.training.run_folder import CHECKPOINT_DIR
from pdmd.training.trainer import Trainer, TrainingDiverged


@pytest.fixture(autouse=True)
def fresh_accelerator_state():
    """accelerate keeps one process-wide state; each Trainer here may ask for another mixed precision."""
    yield
    reset_accelerator_state()


def reset_accelerator_state():
    from accelerate.state import AcceleratorState
    AcceleratorState._reset_state(reset_partial_state=True)


def builtin_config(tmp_path, **overrides) -> TrainConfig:
    config = dict(teacher="builtin", method="phased", schedule={"boundaries": [0.5], "steps": [1, 1]},
                  updates_per_phase=2, batch_size=2, fake_ratio=1, lora={"rank": 2, "alpha": 2}, sample_every=100,
                  checkpoint_every=1, keep_checkpoints=10, output_dir=str(tmp_path / "run"),
                  sample_prompts=["a red circle"])
    return TrainConfig.from_dict({**config, **overrides})


def sd3_config(tiny_pipeline, tmp_path, **overrides) -> TrainConfig:
    config = dict(teacher=str(tiny_pipeline("sd3")), method="phased", schedule={"boundaries": [0.8], "steps": [1, 1]},
                  updates_per_phase=2, batch_size=2, fake_ratio=1, lora={"rank": 2, "alpha": 2},
                  prompts=["a red cat on a sofa", "two blue dogs"], sample_prompts=["a green tree"], sample_every=100,
                  checkpoint_every=1, keep_checkpoints=10, output_dir=str(tmp_path / "run"), height=16, width=16)
    return TrainConfig.from_dict({**config, **overrides})


def newest_state(config: TrainConfig) -> dict:
    newest = checkpoints.list_checkpoints(Path(config.output_dir) / CHECKPOINT_DIR)[-1]
    return load_file(str(newest / "state.safetensors"))


def optimizer_states(trainer: Trainer) -> list[torch.Tensor]:
    """Every optimizer state tensor but the step counts (torch keeps those on the CPU, as float32 scalars)."""
    return [value for optimizer in trainer.optimizers.values() for state in optimizer.optimizer.state.values()
            for key, value in state.items() if key != "step"]


def with_grad_scaler(init_scale: float):
    """An fp16 accelerator with the GradScaler accelerate makes on CUDA (on the CPU it makes none). Autocast stays
    off, so the scaled run computes exactly what an fp32 run does and only the scaler's work differs."""
    from accelerate import Accelerator
    from accelerate.utils import AutocastKwargs

    accelerator = Accelerator(cpu=True, mixed_precision="fp16", kwargs_handlers=[AutocastKwargs(enabled=False)])
    accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=init_scale)
    accelerator.native_amp = True  # what accelerate sets beside its scaler: unscale_gradients acts on it
    return accelerator


@pytest.mark.parametrize("mixed_precision", ["no", "bf16"])
def test_a_bf16_base_trains_float32_adapters_optimizer_states_and_ema(tiny_pipeline, tmp_path, mixed_precision):
    """A bf16 LoRA weight would lose AdamW's ~1e-4 steps to rounding; the bf16 activations pass through the float32
    LoRA layers with and without autocast."""
    trainer = Trainer(sd3_config(tiny_pipeline, tmp_path, dtype="bf16", mixed_precision=mixed_precision,
                                 ema_decay=0.5))
    row = trainer.train_step()
    assert torch.isfinite(torch.tensor(row["loss_generator"])) and row["grad_norm"] > 0
    model = trainer.teacher.model
    assert {p.dtype for n, p in model.named_parameters() if "lora_" in n} == {torch.float32}
    assert {p.dtype for n, p in model.named_parameters() if "lora_" not in n} == {torch.bfloat16}
    assert trainer.teacher.dtype == torch.bfloat16  # the base's dtype, not the adapters'
    states = optimizer_states(trainer)
    assert states and {v.dtype for v in states} == {torch.float32}
    ema = trainer.roles.ema[phase_adapter(0)]
    assert ema and {v.dtype for v in ema.values()} == {torch.float32}


def test_a_resumed_run_with_ema_on_a_bf16_base_equals_an_unbroken_one(tiny_pipeline, tmp_path):
    straight = sd3_config(tiny_pipeline, tmp_path / "a", dtype="bf16", ema_decay=0.5)
    Trainer(straight).fit(progress=False)
    broken = sd3_config(tiny_pipeline, tmp_path / "b", dtype="bf16", ema_decay=0.5)
    Trainer(broken).fit(max_steps=1, progress=False)
    resumed = Trainer(broken)
    assert resumed.resume("latest") is not None and resumed.step == 1
    resumed.fit(progress=False)
    reference, state = newest_state(straight), newest_state(broken)
    assert state.keys() == reference.keys() and any(k.startswith("ema/") for k in reference)
    assert all(torch.equal(state[k], reference[k]) for k in reference)  # bit for bit on the CPU


@pytest.mark.filterwarnings("ignore:for .*copying from a non-meta parameter")  # torch's, for each meta weight
def test_a_resume_puts_every_loaded_tensor_where_its_parameter_is(tmp_path):
    """The meta device stands in for CUDA: a checkpoint loads on the CPU, and a CPU tensor mixed with a meta one
    raises as one mixed with a CUDA tensor does."""
    config = builtin_config(tmp_path, ema_decay=0.5)
    Trainer(config).fit(max_steps=1, progress=False)
    resumed = Trainer(config)
    resumed.teacher.model.to("meta")
    resumed.resume("latest")
    ema = [v for state in resumed.roles.ema.values() for v in state.values()]
    states = optimizer_states(resumed)
    assert ema and states and {v.device.type for v in ema + states} == {"meta"}
    resumed.roles.update_ema(phase_adapter(0), 0.5)  # the next update mixes no devices


class OverflowingBackward(torch.autograd.Function):
    """The identity whose backward overflows: a finite loss with infinite gradients, as fp16 gives them."""

    @staticmethod
    def forward(ctx, loss):
        return loss.clone()

    @staticmethod
    def backward(ctx, grad):
        return torch.full_like(grad, float("inf"))


def test_an_fp16_gradient_overflow_skips_the_update_lowers_the_scale_and_resumes_at_it(tmp_path, monkeypatch):
    from pdmd.core import distill

    real_loss = distill.generator_loss

    def overflowing_generator_loss(*args, **kwargs):
        loss, diagnostics = real_loss(*args, **kwargs)
        return OverflowingBackward.apply(loss), diagnostics

    monkeypatch.setattr(distill, "generator_loss", overflowing_generator_loss)
    config = builtin_config(tmp_path, mixed_precision="fp16", ema_decay=0.5)
    trainer = Trainer(config, accelerator=with_grad_scaler(init_scale=2.0**10))
    expert, fake = (trainer.roles.parameters_of(name) for name in (phase_adapter(0), FAKE))
    before = [p.detach().clone() for p in expert + fake]
    row = trainer.train_step()
    assert all(torch.equal(p, b) for p, b in zip(expert, before))  # skipped: the expert is as it was
    assert any(not torch.equal(p, b) for p, b in zip(fake, before[len(expert):]))  # the fake update was applied
    assert row["grad_norm"] is None and row["skipped_updates"] == 1 and row["grad_scale"] == 2.0**9
    assert trainer.accelerator.scaler.get_scale() == 2.0**9 and not trainer.roles.ema  # no weights, no EMA
    trainer.save_checkpoint()
    reset_accelerator_state()
    resumed = Trainer(config, accelerator=with_grad_scaler(init_scale=2.0**10))
    resumed.resume("latest")
    assert resumed.accelerator.scaler.get_scale() == 2.0**9

    reset_accelerator_state()
    unscaled = Trainer(builtin_config(tmp_path / "fp32"))  # without a scaler the same gradients stop the run
    with pytest.raises(TrainingDiverged, match="generator update of step 1 .* diverged"):
        unscaled.train_step()


def test_gradients_are_clipped_unscaled(tmp_path):
    """The norm the clip sees (and the metrics row reports) is the true gradient's, not 4096 times it."""
    reference = Trainer(builtin_config(tmp_path / "fp32", grad_clip=1e-3)).train_step()
    reset_accelerator_state()
    scaled = Trainer(builtin_config(tmp_path / "fp16", grad_clip=1e-3, mixed_precision="fp16"),
                     accelerator=with_grad_scaler(init_scale=2.0**12)).train_step()
    assert scaled["skipped_updates"] == 0 and scaled["grad_scale"] == 2.0**12
    assert scaled["grad_norm"] == pytest.approx(reference["grad_norm"], rel=1e-5)


def test_the_all_reduce_carries_the_loss_so_that_every_rank_skips_or_stops_alike():
    class TwoRanks:  # the mean over this rank and one whose gradients are equal and whose loss is NaN
        num_processes = 2

        def reduce(self, tensor, reduction):
            other = tensor.clone()
            other[-1] = float("nan")
            return (tensor + other) / 2

    params = [torch.nn.Parameter(torch.ones(2, 3)), torch.nn.Parameter(torch.ones(4))]
    params[0].grad = torch.full((2, 3), 2.0)  # params[1] has no gradient on this rank
    assert not torch.isfinite(average_gradients(TwoRanks(), params, torch.tensor(0.5)))
    assert torch.equal(params[0].grad, torch.full((2, 3), 2.0)) and torch.equal(params[1].grad, torch.zeros(4))


def test_fp16_autocast_on_a_bf16_base_is_refused_in_one_line(tmp_path):
    teacher = load_teacher("builtin")
    teacher.model.to(torch.bfloat16)
    with pytest.raises(ConfigError, match="mixed_precision = 'fp16' would autocast a bf16 teacher to fp16"):
        Trainer(builtin_config(tmp_path, mixed_precision="fp16"), teacher=teacher)


def test_samples_during_training_never_call_the_released_text_encoders(tiny_pipeline, tmp_path):
    config = sd3_config(tiny_pipeline, tmp_path)
    trainer = Trainer(config)
    teacher = trainer.teacher
    expected = teacher.sample(list(config.sample_prompts), config.seed, config.schedule, config.student_cfg,
                              trainer.experts).sample  # encodes, borrowing the encoders back

    def released(*args, **kwargs):
        raise AssertionError("a text encoder ran after release_text_encoders")

    for encoder in teacher.text_encoders:
        encoder.forward = released
    assert trainer.save_samples().is_file()
    again = teacher.sample_encoded(trainer.sample_embeddings, 1, config.seed, config.schedule, config.student_cfg,
                                   trainer.experts).sample
    torch.testing.assert_close(again, expected, rtol=1e-4, atol=1e-5)


def test_free_device_memory_counts_the_allocators_unused_cache(monkeypatch):
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (1000, 8000))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device: 500)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device: 200)
    assert diffusers_base.free_device_memory(torch.device("cuda")) == 1000 + 500 - 200
    assert diffusers_base.free_device_memory(torch.device("cpu")) is None


def test_adamw8bit_compiles_its_update_only_off_the_cpu_and_with_triton(monkeypatch):
    on_cpu, elsewhere = [torch.nn.Parameter(torch.zeros(4))], [torch.nn.Parameter(torch.zeros(4, device="meta"))]
    find_spec = importlib.util.find_spec
    for triton in (True, False):
        monkeypatch.setattr(importlib.util, "find_spec",
                            lambda name: (object() if triton else None) if name == "triton" else find_spec(name))
        assert not compiles_update(on_cpu)
        assert compiles_update(elsewhere) == triton
