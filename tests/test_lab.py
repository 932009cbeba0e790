import json
import subprocess
import sys

import pytest
import torch

from pdmd.cli import main
from pdmd.core import distill
from pdmd.lab import METHOD_CHOICES, LabConfig, Mixture, run_lab

KEYS = {"method", "modes_total", "modes_covered", "mode_kl", "spread_ratio", "sliced_w", "seconds"}
TINY = LabConfig(iters=4, batch=64, fake_ratio=2, teacher_iters=20, teacher_steps=8, eval_samples=500)


@pytest.mark.parametrize("teacher", ["exact", "mlp"])
def test_every_method_runs_and_reports_every_key(teacher):
    results, samples = run_lab(list(METHOD_CHOICES), Mixture.ring(4), teacher, seed=0, config=TINY)
    assert [row["method"] for row in results] == list(METHOD_CHOICES)
    for row in results:
        assert KEYS <= set(row)
        assert row["modes_total"] == 4 and 0 <= row["modes_covered"] <= 4
        assert samples[row["method"]].shape == (500, 2) and torch.isfinite(samples[row["method"]]).all()
    nfe = {row["method"]: row["nfe"] for row in results}
    assert nfe == {"teacher": 8, "dmd": 1, "dmd-sgts": 4, "phased": 4, "phased-sgts": 4}
    phased = next(row for row in results if row["method"] == "phased")
    assert [b["t"] for b in phased["boundary_sliced_w"]] == [0.5]


def test_grid_mixture_has_25_modes():
    grid = Mixture.grid()
    assert grid.num_modes == 25 and grid.means.shape == (25, 2)


def test_cli_prints_one_json_object(capsys):
    assert main(["lab", "--method", "phased", "--modes", "3", "--iters", "2", "--batch", "32",
                 "--fake-ratio", "1", "--teacher-iters", "10", "--samples", "300", "--json"]) == 0
    row = json.loads(capsys.readouterr().out)
    assert isinstance(row, dict) and KEYS <= set(row) and row["method"] == "phased" and row["modes_total"] == 3


def test_cli_all_prints_a_list_and_draws_the_plot(tmp_path, capsys):
    plot = tmp_path / "lab.png"
    assert main(["lab", "--method", "all", "--grid", "--iters", "2", "--batch", "32", "--fake-ratio", "1",
                 "--teacher-iters", "10", "--samples", "300", "--json", "--plot", str(plot)]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [row["method"] for row in rows] == list(METHOD_CHOICES)
    assert plot.stat().st_size > 10_000 and plot.read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("args, message", [
    (["--method", "gan"], "invalid choice: 'gan'"),
    (["--modes", "0"], "0 must be at least 1"),
    (["--iters", "-5"], "-5 must be at least 1"),
    (["--iters", "many"], "'many' is not a whole number"),
])
def test_bad_arguments_exit_2_with_a_message(args, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["lab", *args])
    assert exit_.value.code == 2
    stderr = capsys.readouterr().err
    assert message in stderr and "usage: python -m pdmd lab" in stderr


def test_module_entry_point_exits_2_on_bad_input():
    proc = subprocess.run([sys.executable, "-m", "pdmd", "lab", "--modes", "0"], capture_output=True, text=True)
    assert proc.returncode == 2 and "--modes: 0 must be at least 1" in proc.stderr


def test_methods_share_one_code_path_with_their_budgets():
    assert distill.METHODS["dmd"].schedule.nfe == 1
    assert {distill.METHODS[m].schedule.nfe for m in ("dmd-sgts", "phased", "phased-sgts")} == {4}
    assert distill.METHODS["phased"].schedule.num_phases == 2 and not distill.METHODS["phased"].sgts
    assert distill.METHODS["phased-sgts"].sgts and distill.METHODS["dmd-sgts"].sgts
    with pytest.raises(ValueError, match="unknown method 'gan'"):
        distill.get_method("gan")


def test_a_uniform_smear_covers_no_mode():
    from pdmd.lab import mode_metrics

    grid = Mixture.grid()
    smear = (torch.rand(20_000, 2, generator=torch.Generator().manual_seed(0)) - 0.5) * 5
    metrics = mode_metrics(smear, grid, reference_spread=0.14)
    assert metrics["modes_covered"] == 0 and metrics["sliced_w"] > 0.05
    assert mode_metrics(grid.sample(20_000, torch.Generator().manual_seed(1)), grid, 0.14)["modes_covered"] == 25
