"""The run folder: its readers tolerate whatever a crashed or hostile writer left, and a damaged newest
checkpoint never blocks a resume."""
import json

import pytest
import torch

from pdmd.training import checkpoints
from pdmd.training.run_folder import RunFolder


def test_the_metrics_reader_tolerates_any_line(tmp_path):
    run = RunFolder(tmp_path)
    lines = ['{"step": 1, "phase": 1, "loss_generator": 0.5, "loss_fake": 0.2}',
             '{"step": 99999999, "phase": 7}',             # valid JSON, no loss keys
             '{"step": "x"}', '[1, 2]', '"text"', 'null', '{"phase": 1}', '{"step": -3, "phase": 1}',
             '{"step": 2, "phase": true}', '{"step": 2, "phase', '\x00\xff garbage',
             '{"step": 3, "phase": 2, "loss_generator": "high", "loss_fake": 0.1}']
    run.metrics_file.write_text("\n".join(lines) + "\n")
    rows = run.metrics()
    assert [r["step"] for r in rows] == [1, 3, 99999999]
    assert rows[0]["loss_generator"] == 0.5 and all("loss_fake" in r and "loss_generator" in r for r in rows)
    assert rows[1]["loss_generator"] != rows[1]["loss_generator"]  # a non-number becomes NaN, not an error
    assert run.last_step() == 3


def test_the_probe_reader_keeps_whole_rows_in_step_order(tmp_path):
    run = RunFolder(tmp_path)
    good = {"seconds": 1.5, "adherence": 0.9, "fd": 9.0, "diversity": 6.0, "position_spread": 2.4,
            "size_spread": 0.9, "images": 96}
    run.append_probe({"step": 20, **good})
    run.append_probe({"step": 10, **good, "adherence": 0.5})
    with open(run.probe_file, "a") as handle:
        handle.write('{"step": 30, "seconds": 2.0}\n[1, 2]\n{"step": true, "seconds": 1}\n{"step": 40, "adher')
    run.append_probe({"step": 20, **good, "fd": 8.0})  # measured again after a resume: the last row wins
    rows = run.probes()
    assert [row["step"] for row in rows] == [10, 20]
    assert rows[0]["adherence"] == 0.5 and rows[1]["fd"] == 8.0 and rows[1]["seconds"] == 1.5
    assert RunFolder(tmp_path / "missing").probes() == []


def test_requests_are_taken_once_and_status_survives_garbage(tmp_path):
    run = RunFolder(tmp_path)
    assert run.take_request() is None
    run.request("sample")
    assert run.take_request() == "sample" and run.take_request() is None
    (tmp_path / "control.json").write_text('{"action": "rm -rf"}')
    assert run.take_request() is None
    with pytest.raises(ValueError, match="unknown action"):
        run.request("explode")
    assert run.status() == {}
    (tmp_path / "status.json").write_text("[not, json")
    assert run.status() == {}
    run.write_status("stopped", 4)
    assert run.status() == {"state": "stopped", "step": 4, "error": None}
    run.clear_messages()
    assert run.status() == {}


def test_log_tail_reads_only_the_end(tmp_path):
    run = RunFolder(tmp_path)
    assert run.log_tail() == ""
    run.log_file.write_text("".join(f"line {i}\n" for i in range(100_000)))
    assert run.log_tail(3) == "line 99997\nline 99998\nline 99999"


def test_a_truncated_checkpoint_cannot_be_loaded_and_is_set_aside(tmp_path):
    folder = tmp_path / "checkpoints"
    good = checkpoints.save_checkpoint(folder, 1, {"w": torch.ones(3)}, {}, keep=5)
    bad = checkpoints.save_checkpoint(folder, 2, {"w": torch.zeros(3)}, {}, keep=5)
    data = (bad / "state.safetensors").read_bytes()
    (bad / "state.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(checkpoints.CheckpointError, match="cannot be read"):
        checkpoints.load_checkpoint(bad)
    aside = checkpoints.set_aside(bad)
    assert aside.name == ".damaged-step-000002" and aside.is_dir()  # kept, never deleted
    assert checkpoints.list_checkpoints(folder) == [good]
    assert json.loads((aside / "state.json").read_text())["step"] == 2
