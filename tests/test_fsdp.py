"""FSDP2 on CPU processes (gloo): the frozen base of a tiny Wan 2.2 pipeline (both networks) sharded with
``fully_shard`` across 2 ranks launched by accelerate and trained with phased-sgts; adapters identical on both
ranks, resumable, and every tensor handed to a collective on the rank's device.

One launch covers every multi-process case (each launch costs ~30 s of imports per rank): run as a script, this
file is what each launched rank runs (``_rank_main``).
"""
import json
import os
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from torch import nn

from pdmd.cli import main
from pdmd.training.run_folder import METRICS_FILE

ROOT = Path(__file__).resolve().parents[1]
# every torch.distributed collective that takes tensors (FSDP2 gathers with all_gather_single)
COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_single", "reduce_scatter",
               "reduce_scatter_tensor", "reduce_scatter_single", "broadcast", "reduce", "gather", "scatter",
               "all_to_all", "all_to_all_single")


def _config(tmp_path, folder, name, **overrides) -> Path:
    config = {"teacher": str(folder), "method": "phased-sgts", "schedule": {"boundaries": [0.875], "steps": [1, 2]},
              "updates_per_phase": 3, "batch_size": 2, "fake_ratio": 2, "lr_fake": 1e-3,
              "lora": {"rank": 4, "alpha": 4}, "fsdp": True, "prompts": ["a red fox", "a city at night", "a boat"],
              "sample_every": 1000, "checkpoint_every": 1, "keep_checkpoints": 10, "output_dir": str(tmp_path / name),
              "height": 32, "width": 32, "num_frames": 5, **overrides}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _launch(counts_dir: Path, *runs: list[str]) -> None:
    """Two gloo ranks, each running ``pdmd`` with every argument list of ``runs`` in turn."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    with subprocess.Popen([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                           __file__, str(counts_dir), json.dumps(runs)],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env,
                          start_new_session=True) as proc:
        try:
            _, stderr = proc.communicate(timeout=600)
        except subprocess.TimeoutExpired:  # mismatched collectives hang: end the ranks too, not only the launcher
            os.killpg(proc.pid, signal.SIGKILL)
            raise
    assert proc.returncode == 0, stderr[-3000:]


def test_two_gloo_ranks_shard_both_networks_train_sgts_identically_and_resume_exactly(tiny_pipeline, tmp_path):
    from pdmd.plan.memory import PlanSettings, weight_rows
    from pdmd.training.config import TrainConfig

    folder = tiny_pipeline("wan2.2")
    whole, split = _config(tmp_path, folder, "whole"), _config(tmp_path, folder, "split")
    # a sharded teacher drawing its own condition images: every rank samples them in step (the network's gathers
    # need all ranks), rank 0 writes them, and both train on what it wrote
    drawn = _config(tmp_path, tiny_pipeline("wan2.2-ti2v"), "drawn", condition_teacher="self")
    _launch(tmp_path / "collectives", ["train", "--config", str(whole), "--no-progress"],
            ["train", "--config", str(split), "--no-progress", "--max-steps", "4"],  # stops inside phase 2,
            ["train", "--config", str(split), "--no-progress", "--resume", "latest"],  # its optimiser state saved
            ["train", "--config", str(drawn), "--no-progress", "--max-steps", "1"])
    # (the resumed run is a fresh Trainer in the same processes: every draw of a run is seeded, so only the
    # checkpoint carries state across)
    run = tmp_path / "whole"
    ranks = [json.loads((run / f"rank-{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["step"] == ranks[1]["step"] == 6
    assert ranks[0]["adapters_sha256"] == ranks[1]["adapters_sha256"]
    rows = [json.loads(line) for line in (run / METRICS_FILE).read_text().splitlines()]
    assert rows[-1]["loss_fake"] < rows[3]["loss_fake"]  # phase 2's fake score fits the generator's samples

    shards = [json.loads((run / f"fsdp-rank-{r}.json").read_text()) for r in (0, 1)]
    full = shards[0]["full_base_bytes"]
    assert shards[0]["local_base_bytes"] + shards[1]["local_base_bytes"] >= full
    assert all(abs(s["local_base_bytes"] / full - 0.5) < 0.05 for s in shards)  # about half each
    assert all(s["devices"] == ["cpu"] for s in shards)  # base shards, buffers and adapters on the rank's device
    planned = weight_rows(PlanSettings.from_config(TrainConfig.from_yaml(whole), processes=2, device="cpu"))[0]
    assert sum(r.bytes for r in planned if r.name.startswith("transformer")) == shards[0]["local_base_bytes"]

    conditions = tmp_path / "drawn" / "conditions"
    assert (conditions / "prompts.txt").read_text().splitlines() == ["a red fox", "a city at night", "a boat"]
    assert len(list(conditions.glob("*.png"))) == 3
    assert [json.loads((tmp_path / "drawn" / f"rank-{r}.json").read_text())["step"] for r in (0, 1)] == [1, 1]

    resumed = [json.loads((tmp_path / "split" / f"rank-{r}.json").read_text()) for r in (0, 1)]
    assert resumed[0]["adapters_sha256"] == resumed[1]["adapters_sha256"] == ranks[0]["adapters_sha256"]

    for rank in (0, 1):  # each collective checked its tensors' device: the base's gathers, the flags, the control
        counts = json.loads((tmp_path / "collectives" / f"rank-{rank}.json").read_text())
        assert {"all_gather_single", "all_reduce", "broadcast"} <= set(counts)


@pytest.mark.parametrize("overrides,message", [
    ({}, "needs 2 or more"),  # one process
    ({"quantize": "int8"}, "cannot shard a quantized base")])  # torchao's tensors do not split under fully_shard
def test_a_run_fsdp_cannot_shard_is_refused_in_one_line(tiny_pipeline, tmp_path, capsys, overrides, message):
    path = _config(tmp_path, tiny_pipeline("wan2.2"), "alone", **overrides)
    assert main(["train", "--config", str(path)]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("python -m pdmd")]
    assert len(errors) == 1 and message in errors[0]


class _Reached(Exception):
    """Raised by a fake to end a test where its check is done (a meta tensor cannot be read back, say)."""


class _TwoNetworks:
    """What ``_run_networks_in_step`` drives of a two-network teacher, its networks on the meta device (a stand-in
    for an accelerator); timesteps stay where they are given, so the per-sample routing can be read."""
    network_names = ("high", "low")

    def __init__(self):
        self.model = nn.ModuleDict({name: nn.Linear(4, 4, device="meta") for name in self.network_names})

    def network_at(self, t: float) -> str:
        return "high" if t >= 0.5 else "low"

    @staticmethod
    def timesteps(t, x):
        return t

    def _run(self, network, x, timestep, cond):
        return network(x)

    def velocity(self, x, t, cond):
        raise AssertionError("replaced by _run_networks_in_step")


def test_the_network_flags_are_reduced_on_the_networks_device(monkeypatch):
    """NCCL has no CPU tensors: the all-reduce of which networks any rank needs gets a tensor on the model's
    device (here meta), never one built on the CPU."""
    from pdmd.training.fsdp import _run_networks_in_step

    handed = []

    def all_reduce(tensor, op=None, group=None, async_op=False):
        handed.append(tensor.device)
        raise _Reached  # what a real all-reduce returns on meta cannot be read

    monkeypatch.setattr(torch.distributed, "all_reduce", all_reduce)
    teacher = _TwoNetworks()
    _run_networks_in_step(teacher)
    with pytest.raises(_Reached):
        teacher.velocity(torch.zeros(3, 4, device="meta"), torch.tensor([0.9, 0.2, 0.7]), {})
    assert handed == [torch.device("meta")]


def test_a_sharded_run_loads_its_teacher_into_host_memory_in_the_devices_dtype(tiny_pipeline, tmp_path,
                                                                               monkeypatch):
    """No GPU holds the whole base: with fsdp the trainer loads it on the CPU (bf16, as it would be on CUDA) and
    shard_frozen_base moves only this rank's shards to the device (whose placement the launched ranks check)."""
    import pdmd.teachers
    from pdmd.training.config import TrainConfig
    from pdmd.training.trainer import Trainer

    asked = {}

    def load_teacher(name, **options):
        asked.update(options)
        raise _Reached  # nothing after the load is under test

    monkeypatch.setattr(pdmd.teachers, "load_teacher", load_teacher)
    config = TrainConfig.from_yaml(_config(tmp_path, tiny_pipeline("wan2.2"), "gpus"))
    with pytest.raises(_Reached):
        Trainer(config, accelerator=SimpleNamespace(device=torch.device("cuda", 1)))
    assert asked["device"] == "cpu" and asked["dtype"] == torch.bfloat16
    assert asked["offload"]  # text encoders and VAE borrowed by the device only while they run


def test_sgts_exit_steps_are_alike_on_every_rank_while_noise_is_per_rank(tmp_path, monkeypatch):
    """A rollout's SGTS exit step sets how many sharded forwards it runs, so two ranks draw the same exit steps
    for the same (seed, update) and different noise (docs/method.md §5)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    from pdmd.core import distill
    from pdmd.training.config import TrainConfig
    from pdmd.training.trainer import Trainer

    drawn = []
    rollout = distill.rollout

    def recording_rollout(experts, phase, schedule, noise, cond=None, **options):
        calls = []

        def counted(x, t, c):
            calls.append(float(t[0]))
            return experts[phase](x, t, c)

        out = rollout([*experts[:phase], counted], phase, schedule, noise, cond, **options)
        drawn[-1].append((noise.clone(), len(calls) - 1))  # exit step j: j steps without grad, then j itself
        return out

    monkeypatch.setattr(distill, "rollout", recording_rollout)
    config = TrainConfig(method="phased-sgts", schedule={"boundaries": [0.5], "steps": [3, 3]},
                         updates_per_phase=(2,), batch_size=1, fake_ratio=1, lora={"rank": 2, "alpha": 2},
                         sample_every=100, output_dir=str(tmp_path / "run"), seed=3)
    for rank in (0, 1):
        monkeypatch.setattr(Accelerator, "process_index", property(lambda self, rank=rank: rank))
        drawn.append([])
        try:
            trainer = Trainer(config)
            for _ in range(2):
                trainer.train_step()
        finally:  # accelerate keeps one process-wide state
            AcceleratorState._reset_state(reset_partial_state=True)
    (rank_0, rank_1) = drawn
    assert [j for _, j in rank_0] == [j for _, j in rank_1]
    assert len({j for _, j in rank_0}) > 1  # exit steps do vary, across rollouts and updates
    assert not any(torch.equal(a, b) for (a, _), (b, _) in zip(rank_0, rank_1))


def _check_collective_devices(counts: Counter) -> None:
    """Wrap every tensor collective of torch.distributed (the module's own names too, which its helpers such as
    broadcast_object_list call) to assert that each tensor handed to it lies on the accelerator's device."""
    import torch.distributed as dist
    import torch.distributed.distributed_c10d as c10d
    from accelerate import PartialState

    def tensors(value):
        if isinstance(value, torch.Tensor):
            yield value
        elif isinstance(value, (list, tuple)):
            for item in value:
                yield from tensors(item)

    def checked(name, collective):
        def call(*args, **kwargs):
            device = PartialState().device  # cpu:0 under MULTI_CPU, where tensors say cpu
            for tensor in tensors([*args, *kwargs.values()]):
                on = tensor.device
                assert (on.type, on.index or 0) == (device.type, device.index or 0), \
                    f"{name} was handed a tensor on {on}, the rank's device is {device}"
            counts[name] += 1
            return collective(*args, **kwargs)
        return call

    for name in COLLECTIVES:
        wrapped = checked(name, getattr(c10d, name))
        setattr(c10d, name, wrapped)
        setattr(dist, name, wrapped)


def _rank_main(counts_dir: str, runs: str) -> int:
    counts = Counter()
    _check_collective_devices(counts)
    codes = [main(argv) for argv in json.loads(runs)]
    folder = Path(counts_dir)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"rank-{os.environ['RANK']}.json").write_text(json.dumps(counts))
    return max(codes)


if __name__ == "__main__":
    sys.exit(_rank_main(*sys.argv[1:]))
