"""Every distillation method on every diffusers family: the method (pdmd/core/distill.py) knows nothing of a
family, so one update of each on each family's tiny pipeline proves the pairing -- a single-phase run (dmd) and
SGTS's drawn exit steps reach the family's velocity, guidance and conditioning as the phased run does. The phased
method's full round trip per family (export, reload, stock pipeline) is in each family's own test file."""
import json
from pathlib import Path

import pytest

from pdmd.training.config import TrainConfig
from pdmd.training.trainer import Trainer

SIZES = {"sd3": dict(height=16, width=16), "flux-dev": dict(height=16, width=16),
         "flux-schnell": dict(height=16, width=16), "wan2.1": dict(height=16, width=16, num_frames=5),
         "wan2.2": dict(height=16, width=16, num_frames=5), "wan2.2-ti2v": dict(height=32, width=32, num_frames=5),
         "qwen-image": dict(height=32, width=32), "z-image": dict(height=16, width=16),
         "flux2-dev": dict(height=16, width=16), "flux2-klein": dict(height=16, width=16),
         "hunyuan-video-1.5": dict(height=32, width=32, num_frames=5), "qwen-image21": dict(height=32, width=64)}
# one-phase methods take one phase; the phased ones two, split at 0.8 (Wan 2.2: one expert each)
SCHEDULES = {"phased": {"boundaries": [0.8], "steps": [1, 1]}, "phased-sgts": {"boundaries": [0.8], "steps": [1, 2]},
             "dmd": {"boundaries": [], "steps": [2]}, "dmd-sgts": {"boundaries": [], "steps": [2]}}


@pytest.fixture(autouse=True)
def fresh_accelerator_state():
    from accelerate.state import AcceleratorState

    yield
    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.mark.filterwarnings("ignore:phase 1 has steps .* on both networks")  # Wan 2.2's one-phase runs: expected
@pytest.mark.parametrize("method", ["phased-sgts", "dmd", "dmd-sgts"])
@pytest.mark.parametrize("family", list(SIZES))
def test_one_update_of_each_method_on_each_family(tmp_path, tiny_pipeline, family, method):
    config = TrainConfig.from_dict(dict(
        teacher=str(tiny_pipeline(family)), method=method, schedule=SCHEDULES[method], updates_per_phase=1,
        batch_size=1, fake_ratio=1, lora={"rank": 2, "alpha": 2}, prompts=["a red cat on a sofa", "two blue dogs"],
        sample_every=100, checkpoint_every=100, lr_generator=1e-2, output_dir=str(tmp_path / "run"),
        **SIZES[family]))
    result = Trainer(config).fit(progress=False)
    rows = [json.loads(line) for line in (Path(config.output_dir) / "metrics.jsonl").read_text().splitlines()]
    phases = config.schedule.num_phases
    assert result["finished"] and result["step"] == phases
    assert [r["phase"] for r in rows] == list(range(1, phases + 1))
    assert all(r["loss_fake"] > 0 and r["loss_generator"] == r["loss_generator"] for r in rows)  # finite, not NaN
