"""FSDP2 on CPU processes (gloo): the frozen base of a tiny Wan 2.2 pipeline (both networks) sharded with
``fully_shard`` across 2 ranks launched by accelerate; adapters identical on both ranks, resumable."""
import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

from pdmd.cli import main
from pdmd.training.run_folder import METRICS_FILE

ROOT = Path(__file__).resolve().parents[1]


def _config(tmp_path, folder, name, **overrides) -> Path:
    config = dict(teacher=str(folder), schedule={"boundaries": [0.875], "steps": [1, 2]}, updates_per_phase=3,
                  batch_size=2, fake_ratio=2, lr_fake=1e-3, lora={"rank": 4, "alpha": 4}, fsdp=True,
                  prompts=["a red fox", "a city at night", "a boat"], sample_every=1000, checkpoint_every=1,
                  keep_checkpoints=10, output_dir=str(tmp_path / name), height=32, width=32, num_frames=5)
    config.update(overrides)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _launch(path: Path, *extra: str) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                           "-m", "pdmd", "train", "--config", str(path), "--no-progress", *extra],
                          capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_two_gloo_ranks_shard_the_base_train_identically_and_resume_exactly(tiny_pipeline, tmp_path):
    from pdmd.plan.memory import PlanSettings, weight_rows
    from pdmd.training.config import TrainConfig

    folder = tiny_pipeline("wan2.2")
    whole = _config(tmp_path, folder, "whole")
    _launch(whole)
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
    planned = weight_rows(PlanSettings.from_config(TrainConfig.from_yaml(whole), processes=2, device="cpu"))[0]
    assert sum(r.bytes for r in planned if r.name.startswith("transformer")) == shards[0]["local_base_bytes"]

    split = _config(tmp_path, folder, "split")
    _launch(split, "--max-steps", "4")  # stops inside phase 2, with its optimiser state in the checkpoint
    _launch(split, "--resume", "latest")
    resumed = [json.loads((tmp_path / "split" / f"rank-{r}.json").read_text()) for r in (0, 1)]
    assert resumed[0]["adapters_sha256"] == resumed[1]["adapters_sha256"] == ranks[0]["adapters_sha256"]


def test_fsdp_with_one_process_is_refused_in_one_line(tiny_pipeline, tmp_path, capsys):
    path = _config(tmp_path, tiny_pipeline("wan2.2"), "alone")
    assert main(["train", "--config", str(path)]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("python -m pdmd")]
    assert len(errors) == 1 and "needs 2 or more" in errors[0]
