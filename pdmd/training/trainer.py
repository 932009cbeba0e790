"""LoRA phased distillation on one device or many (accelerate); ``python -m pdmd train`` runs it.

Phases are trained in order (docs/method.md §2): expert k's adapter learns while experts 1..k-1 stay frozen, a
fresh fake adapter is fitted to the generator's x_s with the subinterval loss (§4), and the teacher is the base
with adapters disabled. Randomness of update n is a pure function of (seed, rank, n) (pdmd.training.steps), so a
resumed run repeats what an uninterrupted one would have done: bit for bit on the CPU, within float tolerance on
CUDA, whose default kernels are not deterministic. Checkpoints hold adapters, optimizers, EMA, the step and the
fp16 loss scale. Adapters, their optimizer states and the EMA are float32 on any base (pdmd.students.roles).
"""
from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path

import torch
from torch import Tensor
from torch.profiler import record_function  # labels for bench-train --profile; near free when off

from pdmd.core import distill
from pdmd.media import as_stills, save_png
from pdmd.students.card import write_card
from pdmd.students.folder import load_phases, save_student, warn_about_shared_phases
from pdmd.students.manifest import Manifest
from pdmd.students.roles import FAKE, Roles, phase_adapter
from pdmd.training import checkpoints, warm_start
from pdmd.training.conditioning import condition_pairs, drawing_teacher, encode_run
from pdmd.training.config import ConfigError, TrainConfig
from pdmd.training.from_student import check_student_fits
from pdmd.training.gradients import average_gradients, clip_gradients
from pdmd.training.metrics_row import metrics_row, progress_postfix
from pdmd.training.optimizers import build_optimizer, load_optimizers_tensors, optimizers_tensors
from pdmd.training.run_folder import RunFolder
from pdmd.training.steps import exit_generator, phase_of, select, set_generator_rate, step_generator


class TrainingDiverged(RuntimeError):
    """A non-finite loss, or a non-finite gradient without fp16's GradScaler (which skips such an update and
    lowers its scale instead): raised before the update is applied, so adapters and checkpoints stay finite."""


class Trainer:
    def __init__(self, config: TrainConfig, accelerator=None, teacher=None):
        from accelerate import Accelerator

        from pdmd.teachers import load_teacher

        self.config = config
        self.accelerator = accelerator or Accelerator(
            cpu=not torch.cuda.is_available(),  # on CPU, launched ranks then join a gloo group (MULTI_CPU)
            mixed_precision=config.mixed_precision,
            log_with="tensorboard" if config.report_to == "tensorboard" else None,
            project_dir=config.output_dir)
        self.run = RunFolder(config.output_dir)
        self.method = distill.get_method(config.method, config.schedule)
        self.schedule = config.schedule
        if teacher is None and config.fsdp:  # into host memory: only this rank's shards go to the device
            from pdmd.training.fsdp import load_teacher_on_cpu
            teacher = load_teacher_on_cpu(config, self.accelerator.device)
        self.teacher = teacher or load_teacher(config.teacher, device=self.accelerator.device,
                                               **config.teacher_options())
        if config.mixed_precision == "fp16" and torch.bfloat16 in {p.dtype for p in self.teacher.model.parameters()}:
            raise ConfigError("mixed_precision = 'fp16' would autocast a bf16 teacher to fp16: use mixed_precision "
                              "bf16 (or no) on a bf16 teacher, or load it with dtype: fp16 or fp32")
        names = [phase_adapter(k) for k in range(self.schedule.num_phases)]
        torch.manual_seed(config.seed)  # identical adapter initialisation on every rank
        self.roles = Roles(self.teacher, names + [FAKE], config.lora)
        warn_about_shared_phases(self.teacher, self.schedule)
        if config.fsdp:
            from pdmd.training.fsdp import shard_frozen_base
            shard_frozen_base(self.teacher, self.accelerator, self.run.path)
        if config.gradient_checkpointing is True:
            self.teacher.enable_gradient_checkpointing()
        self.teacher_cfg = self.teacher.default_cfg if config.teacher_cfg is None else config.teacher_cfg
        # guidance as a network input (FLUX.1-dev): the real score at teacher_cfg, students and fake at student_cfg
        guided = self.teacher.with_guidance
        self.experts = [guided(self.roles.velocity(name), config.student_cfg) for name in names]
        self.fake = guided(self.roles.velocity(FAKE), config.student_cfg)
        self.real = guided(self.roles.velocity(None), self.teacher_cfg)
        pairs, source = condition_pairs(  # condition images given, drawn now (or by the run before a resume), or none
            config, self.teacher, self.run.conditions,
            lambda drawer: drawing_teacher(drawer, self.teacher, self.roles, config, self.accelerator.device),
            write=self.is_main, wait=self.accelerator.wait_for_everyone)
        run = encode_run(config, self.teacher, pairs, source)  # its prompts, or its images with their prompts, once
        self.prompts, self.cond, self.uncond = run.prompts, run.cond, run.uncond
        self.condition_image_count, self.condition_source = run.condition_images, run.condition_source  # 0: text-only
        # what the conditions fix in a sample (docs/method.md §6); a text-only run fixes nothing, and says so
        self.impose = self.teacher.impose_conditions if self.condition_image_count else distill.unconditioned
        self.sample_prompts, self.sample_embeddings = run.sample_prompts, run.sample_embeddings
        self.teacher.release_text_encoders()  # their device memory goes to training
        self.step = 0
        self.phases_from: dict | None = None  # earlier experts taken from another student (start_from_student)
        self.optimizers = None
        self.optimizer_phase = -1
        self._probe = None  # the probe network, loaded at the first probe_every measurement
        self._pairs = None  # the teacher's trajectories of the regression warm start, solved when first needed
        self.skipped_updates = 0  # this step's updates that fp16's GradScaler skipped (overflowing gradients)
        self.stop_requested = False  # set by SIGTERM: stop like control.json's "stop" after this step

    # --- state -------------------------------------------------------------------------------------------
    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    def _build_optimizers(self, phase: int) -> None:
        c = self.config
        generator = build_optimizer(c.optimizer, self.roles.parameters_of(phase_adapter(phase)), c.lr_generator,
                                    c.weight_decay)
        fake = build_optimizer(c.optimizer, self.roles.parameters_of(FAKE), c.lr_fake, c.weight_decay)
        self.optimizers = dict(zip(("generator", "fake"), self.accelerator.prepare(generator, fake)))
        self.optimizer_phase = phase

    def _start_phase(self, phase: int, fresh: bool) -> None:
        for name in self.roles.adapters:
            trainable = name in (phase_adapter(phase), FAKE)
            for param in self.roles.parameters_of(name):
                param.requires_grad_(trainable)
        if fresh and phase > 0:  # the finished expert as it will be exported (its EMA, when on) rolls out from now on
            self.roles.adopt_ema(phase_adapter(phase - 1))
        if fresh:  # docs/method.md §4: the fake score restarts from the teacher in every phase (seeded: resumable)
            torch.manual_seed(self.config.seed * 1_000_003 + phase)
            self.roles.reset(FAKE)
        self._build_optimizers(phase)

    def state_tensors(self) -> dict[str, Tensor]:
        """The roles' tensors (adapters, EMA) and the optimizers' states."""
        return {**self.roles.tensors(), **optimizers_tensors(self.optimizers)}

    def save_checkpoint(self) -> Path | None:
        if not self.is_main:
            return None
        scaler = self.accelerator.scaler  # fp16: a resumed run goes on at the loss scale reached
        meta = {"phase": phase_of(self.config, self.step)[0], "config": self.config.as_dict(),
                "phases_from": self.phases_from, "grad_scaler": scaler.state_dict() if scaler else None}
        return checkpoints.save_checkpoint(self.run.checkpoints, self.step, self.state_tensors(), meta,
                                           keep=self.config.keep_checkpoints)

    def load_checkpoint(self, path: Path) -> None:
        tensors, meta = checkpoints.load_checkpoint(path)
        self.step = int(meta["step"])
        self.phases_from = meta.get("phases_from")
        self.roles.load_tensors(tensors)
        if self.accelerator.scaler is not None and meta.get("grad_scaler"):
            self.accelerator.scaler.load_state_dict(meta["grad_scaler"])
        phase, step_in_phase = phase_of(self.config, self.step)
        if step_in_phase == 0:
            return  # a phase boundary: the next step starts the new phase fresh, as an unbroken run would
        self._start_phase(phase, fresh=False)
        load_optimizers_tensors(self.optimizers, tensors)

    def resume(self, which: str = "latest", say=print) -> Path | None:
        """Load checkpoint ``which`` (a folder), or with "latest" the newest one that loads: a damaged one is
        set aside with one line saying so, and the one before it is used. None: no checkpoint yet."""
        if which != "latest":
            path = checkpoints.resolve_checkpoint(self.run.checkpoints, which)
            self.load_checkpoint(path)
            return path
        return checkpoints.load_newest(self.run.checkpoints, self.load_checkpoint, say)

    def start_from_student(self, folder: str | Path, start_phase: int) -> None:
        """Take experts 1..start_phase-1 from a finished student and train from phase ``start_phase`` (1-based)
        on, as an unbroken run of this config would from that phase boundary (docs/method.md §2: a later phase can be
        retrained without changing what earlier phases decided). Their sampling steps must be this schedule's."""
        folder = Path(folder)
        manifest = Manifest.read(folder)
        check_student_fits(manifest, self.config, start_phase, str(folder))
        kept = range(start_phase - 1)
        self.roles.check_same_lora(manifest.lora, str(folder))
        load_phases(self.roles, folder, manifest, kept)
        self.step = sum(self.config.updates_per_phase[: start_phase - 1])
        self.phases_from = {"student": str(folder), "phases": [k + 1 for k in kept]}

    # --- one generator update ----------------------------------------------------------------------------
    def _update(self, role: str, adapter: str, loss: Tensor) -> float | None:
        """Backward, all-reduce, clip and step one role's adapter: the gradient norm, or None when fp16's
        GradScaler skipped the step (gradients that overflowed at its scale, which it then lowers: normal early
        in an fp16 run, counted in the metrics row)."""
        optimizer = self.optimizers[role]
        params = [p for group in optimizer.optimizer.param_groups for p in group["params"]]
        with self.roles.active(adapter), record_function(f"{role}/backward"):
            self.accelerator.backward(loss)  # with the adapter active: gradient checkpointing re-runs forwards
        mean_loss = average_gradients(self.accelerator, params, loss)
        norm = clip_gradients(self.accelerator, optimizer, params, self.config.grad_clip)
        overflow_skips = self.accelerator.scaler is not None  # the scaler skips a step with non-finite gradients
        if not torch.isfinite(mean_loss) or not (overflow_skips or torch.isfinite(norm)):
            optimizer.zero_grad(set_to_none=True)
            rate = f"lr_{'fake' if role == 'fake' else 'generator'}"
            raise TrainingDiverged(
                f"the {role} update of step {self.step + 1} (phase {phase_of(self.config, self.step)[0] + 1}) "
                f"diverged: loss {float(mean_loss):g}, gradient norm {float(norm):g}; nothing was applied. Lower "
                f"{rate} (now {getattr(self.config, rate):g}) and resume: the latest checkpoint is from before "
                "this step")
        with record_function(f"{role}/optimizer"):
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        if optimizer.step_was_skipped:
            self.skipped_updates += 1
            return None
        return float(norm)

    def _batch(self, generator: torch.Generator):
        """Noise and the conditioning of ``batch_size`` prompts drawn from the run's list."""
        c = self.config
        index = torch.randint(len(self.prompts), (c.batch_size,), generator=generator)
        noise = torch.randn((c.batch_size, *self.teacher.latent_shape), generator=generator)
        return noise.to(self.accelerator.device), select(self.cond, index), select(self.uncond, index)

    @contextlib.contextmanager
    def _checkpointed_rollout(self):
        """``gradient_checkpointing: rollout``: checkpoint the generator's multi-step graph (the memory peak)
        only; the backward pass recomputes whatever was checkpointed in the forward, flag or not."""
        if self.config.gradient_checkpointing != "rollout":
            yield
            return
        self.teacher.enable_gradient_checkpointing()
        try:
            yield
        finally:
            self.teacher.enable_gradient_checkpointing(False)

    def _fake_update(self, x_s: Tensor, s: float, cond, generator: torch.Generator) -> float:
        """One update of the fake score on the generator's samples x_s (docs/method.md §4, Eq. (20))."""
        with self.accelerator.autocast(), record_function("fake/forward"):
            loss = distill.fake_loss(self.fake, x_s, s, cond, shift=self.config.renoise_shift, generator=generator,
                                     impose=self.impose)
        self._update("fake", FAKE, loss)
        return loss.item()

    def _regression_step(self, phase: int, generator: torch.Generator) -> dict:
        """One warm-start update of expert k by ``distill.regression_loss`` on a batch of the teacher's pairs."""
        started = time.perf_counter()
        if self._pairs is None:  # solved once per run, when first needed
            with torch.no_grad(), self.accelerator.autocast(), record_function("regression/teacher pairs"):
                self._pairs = warm_start.teacher_pairs(self.config, self.teacher, self.real, self.teacher_cfg,
                                                       self.cond, self.uncond, len(self.prompts),
                                                       self.accelerator.device)
        start, target, cond = warm_start.pair_batch(self._pairs, phase, self.config.batch_size, generator)
        with self._checkpointed_rollout(), self.accelerator.autocast(), record_function("regression/rollout"):
            loss = distill.regression_loss(self.experts, phase, self.schedule, start, target, cond,
                                           impose=self.impose)
        grad_norm = self._update("generator", phase_adapter(phase), loss)
        self._update_ema(phase, grad_norm)
        self.step += 1
        return self._metrics_row(phase, started, grad_norm, loss_regression=loss.item())

    def _update_ema(self, phase: int, grad_norm: float | None) -> None:
        if self.config.ema_decay and grad_norm is not None:  # a step the GradScaler skipped changed no weight
            with record_function("generator/ema"):
                self.roles.update_ema(phase_adapter(phase), self.config.ema_decay)

    def _metrics_row(self, phase: int, started: float, grad_norm: float | None, **losses) -> dict:
        return metrics_row(self.step, phase, started, grad_norm, self.optimizers["generator"], self.accelerator.device,
                           self.accelerator.scaler, self.skipped_updates, **losses)

    def train_step(self) -> dict:
        """One generator update of the current phase k (docs/method.md §5): ``fake_ratio`` updates of the fake
        score (§4, Eq. (20)) and one DMD update of expert k on a rollout that carries its gradient (§3, Eqs.
        (12)-(14)). ``fake_rollout: fresh`` draws a rollout for every fake update, before the generator's;
        ``generator`` (DMD2's way) runs them after it, on the generator's own detached x_s, each with fresh
        re-noising: no rollouts besides the generator's, so the fake updates cost a forward and backward each."""
        c, (phase, update) = self.config, phase_of(self.config, self.step)
        if self.optimizer_phase != phase:
            self._start_phase(phase, fresh=True)
        set_generator_rate(c, self.optimizers["generator"], phase, update)
        generator = step_generator(c, self.accelerator.process_index, self.step)
        self.skipped_updates = 0
        if update < c.warm_start_updates(phase):
            return self._regression_step(phase, generator)
        started = time.perf_counter()
        exit_steps = exit_generator(c, self.step)  # alike on every rank: the number of forwards depends on it

        fake_losses = []
        for _ in range(c.fake_ratio if c.fake_rollout == "fresh" else 0):
            noise, cond, _ = self._batch(generator)
            with torch.no_grad(), self.accelerator.autocast(), record_function("fake/rollout"):
                x_s, s = distill.rollout(self.experts, phase, self.schedule, noise, cond,
                                         sgts=self.method.sgts, generator=exit_steps,
                                         impose=self.impose)
            fake_losses.append(self._fake_update(x_s, s, cond, generator))

        noise, cond, uncond = self._batch(generator)
        with self._checkpointed_rollout(), self.accelerator.autocast(), record_function("generator/rollout"):
            x_s, s = distill.rollout(self.experts, phase, self.schedule, noise, cond,
                                     sgts=self.method.sgts, generator=exit_steps, impose=self.impose)
        with self.accelerator.autocast():
            loss, diagnostics = distill.generator_loss(
                x_s, s, self.real, self.fake, cond, uncond, self.teacher_cfg, combine=self.teacher.combine_guidance,
                shift=c.renoise_shift, gradient=c.gradient, generator=generator, impose=self.impose)
        grad_norm = self._update("generator", phase_adapter(phase), loss)
        self._update_ema(phase, grad_norm)
        for _ in range(c.fake_ratio if c.fake_rollout == "generator" else 0):
            fake_losses.append(self._fake_update(x_s.detach(), s, cond, generator))
        self.step += 1

        return self._metrics_row(phase, started, grad_norm, loss_generator=loss.item(),
                                 loss_fake=sum(fake_losses) / len(fake_losses),
                                 **{name: float(value) for name, value in diagnostics.items()})

    # --- outputs -----------------------------------------------------------------------------------------
    def export_student(self) -> Path:
        """The student folder: EMA weights when EMA is on, else the trained adapters."""
        c = self.config
        provenance = dict(teacher=c.teacher, method=c.method, student_cfg=c.student_cfg, teacher_cfg=self.teacher_cfg,
                          updates_trained=self.step, updates_per_phase=c.updates_per_phase, ema_decay=c.ema_decay,
                          seed=c.seed, phases_from=self.phases_from,
                          conditions=self.teacher.conditions if self.condition_image_count else (),
                          condition_images=self.condition_image_count or None,
                          condition_source=self.condition_source)
        with self.roles.ema_weights():
            checkpoints.atomic_export(self.run.student,
                                      lambda folder: save_student(folder, self.roles, self.schedule, **provenance))
        # README.md, the Hub model card (named after the folder, so written once it has its final name)
        write_card(self.run.student, seconds=self.run.training_seconds(), sample_grid=self.run.latest_sample)
        return self.run.student

    @torch.no_grad()
    def save_samples(self) -> Path | None:
        """The fixed prompt / seed grid, from the embeddings encoded at the start (the text encoders stay off)."""
        result = self.teacher.sample_encoded(self.sample_embeddings, len(self.sample_prompts), self.config.seed,
                                             self.schedule, self.config.student_cfg, self.experts)
        images = as_stills(self.teacher.decode(result.sample))
        save_png(images, self.run.latest_sample)
        return save_png(images, self.run.sample_file(self.step))

    @torch.no_grad()
    def probe(self) -> dict:
        """The student as it would be exported (EMA weights when on) measured on the fixed probe set, appended to
        probe.jsonl with the training time so far: one point of the adherence / FD curve."""
        from pdmd.builtin.evaluate import eval_prompts, evaluate

        if self._probe is None:
            from pdmd.builtin.metrics import load_probe
            self._probe = load_probe()
        with self.roles.ema_weights():
            measured = evaluate(self.teacher, self.schedule, self.config.student_cfg, seed=0, prompts=eval_prompts(12),
                                per_prompt=self.config.probe_per_prompt, experts=self.experts, probe=self._probe)
        row = {"step": self.step, "seconds": round(self.run.training_seconds() or 0.0, 2),
               **{k: round(float(measured[k]), 4) for k in ("adherence", "fd", "diversity", "position_spread",
                                                           "size_spread")}, "images": measured["images"]}
        self.run.append_probe(row)
        return row

    # --- the loop ----------------------------------------------------------------------------------------
    def _control(self) -> str | None:
        """The job manager's request, read by the main process and shared with every rank."""
        action = self.run.take_request() if self.is_main else None
        if self.is_main and self.stop_requested:
            action = "stop"
        if self.accelerator.num_processes > 1:
            from accelerate.utils import broadcast_object_list
            action = broadcast_object_list([action])[0]
        return action

    def fit(self, max_steps: int | None = None, progress: bool = True) -> dict:
        from tqdm.auto import tqdm

        c = self.config
        end = c.total_updates if max_steps is None else min(c.total_updates, max_steps)
        if self.is_main:
            self.run.path.mkdir(parents=True, exist_ok=True)
            (self.run.path / "config.json").write_text(json.dumps(c.as_dict(), indent=2))
        if c.report_to == "tensorboard":
            self.accelerator.init_trackers("pdmd")
        bar = tqdm(total=c.total_updates, initial=self.step, disable=not (progress and self.is_main),
                   desc="distilling", dynamic_ncols=True)
        stopped = False
        # only the main process logs; the others hold a null context and never write
        with open(self.run.metrics_file, "a") if self.is_main else contextlib.nullcontext() as log:
            while self.step < end:
                row = self.train_step()
                bar.update(1)
                bar.set_postfix(**progress_postfix(row))
                action = self._control()
                if self.is_main:
                    self.run.append_metrics(log, row)
                    if c.report_to == "tensorboard":
                        self.accelerator.log(row, step=self.step)
                    if self.step % c.sample_every == 0 or action == "sample":
                        self.save_samples()
                    if c.probe_every and (self.step % c.probe_every == 0 or self.step == c.total_updates):
                        self.probe()
                if self.step % c.checkpoint_every == 0 or action in ("save", "stop") or self.step == end:
                    self.save_checkpoint()
                if action == "stop":
                    stopped = True
                    break
        bar.close()
        finished = self.step >= c.total_updates
        if self.is_main and finished:
            self.export_student()
        if self.is_main:
            self.run.write_status("finished" if finished else "stopped", self.step)
        (self.run.path / f"rank-{self.accelerator.process_index}.json").write_text(
            json.dumps({"step": self.step, "adapters_sha256": self.roles.fingerprint()}))
        self.accelerator.wait_for_everyone()
        if c.report_to == "tensorboard":
            self.accelerator.end_training()
        return {"step": self.step, "finished": finished, "stopped": stopped,
                "student": str(self.run.student) if finished else None}
