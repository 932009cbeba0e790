import argparse
import json
import subprocess
import sys

import pytest
import torch

from pdmd.cli import main
from pdmd.commands.arguments import seed_list
from pdmd.core import distill
from pdmd.lab import METHOD_CHOICES, LabConfig, Mixture, cell_text, run_lab, summarize, summary_table

KEYS = {"method", "in_modes", "modes_total", "modes_covered", "mode_kl", "spread_ratio", "sliced_w", "seconds",
        "nfe"}
TINY = LabConfig(iters=4, batch=64, fake_ratio=2, teacher_iters=20, teacher_steps=8, eval_samples=500)


@pytest.mark.parametrize("teacher", ["exact", "mlp"])
def test_every_method_runs_and_reports_every_key(teacher):
    results, samples = run_lab(list(METHOD_CHOICES), Mixture.ring(4), teacher, seed=0, config=TINY)
    assert [row["method"] for row in results] == list(METHOD_CHOICES)
    for row in results:
        assert KEYS <= set(row)
        assert row["modes_total"] == 4 and 0 <= row["modes_covered"] <= 4 and 0 <= row["in_modes"] <= 1
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
    (["--seeds", "0-20"], "'0-20' names 21 seeds; at most 10"),
    (["--seed", "1", "--seeds", "0-1"], "not allowed with argument --seed"),
    (["--beta1", "1"], "1 must be below 1"),
])
def test_bad_arguments_exit_2_with_a_message(args, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["lab", *args])
    assert exit_.value.code == 2
    stderr = capsys.readouterr().err
    assert message in stderr and "usage: python -m pdmd lab" in stderr


def test_module_entry_point_exits_2_on_bad_input():
    proc = subprocess.run([sys.executable, "-m", "pdmd", "lab", "--modes", "0"], capture_output=True, text=True,
                          check=False)
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
    assert 0.2 < metrics["in_modes"] < 0.35  # 25 disks of radius 0.3 cover ~28% of the 5x5 square
    data = mode_metrics(grid.sample(20_000, torch.Generator().manual_seed(1)), grid, 0.14)
    assert data["modes_covered"] == 25 and data["in_modes"] > 0.98


def row(method, in_modes, kl, boundary=None):
    entry = {"method": method, "in_modes": in_modes, "modes_covered": 25, "modes_total": 25, "mode_kl": kl,
             "spread_ratio": 1.0, "sliced_w": 0.05, "seconds": 10.0, "nfe": 4}
    if boundary is not None:
        entry["boundary_sliced_w"] = [{"t": 0.5, "sliced_w": boundary}]
    return entry


def test_summarize_gives_the_mean_and_sample_std_of_every_metric():
    runs = [[row("teacher", 0.9, 0.01), row("phased", 0.8, 0.02, boundary=0.1)],
            [row("teacher", 0.9, 0.03), row("phased", 0.6, 0.04, boundary=0.2)],
            [row("teacher", 0.9, 0.05), row("phased", 0.7, 0.06, boundary=0.3)]]
    teacher, phased = summarize(runs)
    assert teacher["method"] == "teacher" and teacher["runs"] == 3
    assert teacher["in_modes"] == {"mean": pytest.approx(0.9), "std": pytest.approx(0.0, abs=1e-12)}
    assert teacher["mode_kl"] == {"mean": pytest.approx(0.03), "std": pytest.approx(0.02)}
    assert phased["in_modes"] == {"mean": pytest.approx(0.7), "std": pytest.approx(0.1)}
    assert phased["modes_covered"] == {"mean": 25.0, "std": 0.0} and phased["nfe"]["mean"] == 4
    assert set(phased) >= KEYS | {"runs", "boundary_sliced_w"}
    assert phased["boundary_sliced_w"] == [{"t": 0.5, "sliced_w": {"mean": pytest.approx(0.2),
                                                                   "std": pytest.approx(0.1)}}]
    assert "boundary_sliced_w" not in teacher


def test_one_run_has_zero_std_and_mismatched_runs_are_refused():
    (only,) = summarize([[row("dmd", 0.5, 0.1)]])
    assert only["in_modes"] == {"mean": 0.5, "std": 0.0}
    with pytest.raises(ValueError, match="different orders"):
        summarize([[row("dmd", 0.5, 0.1)], [row("phased", 0.5, 0.1)]])


def test_cell_text_and_the_summary_table():
    assert cell_text(0.9312, 0.0234) == "0.93 ± 0.02"
    assert cell_text(24.6, 0.548, 1) == "24.6 ± 0.5"
    headers, rows = summary_table(summarize([[row("phased", 0.8, 0.02, boundary=0.1)],
                                             [row("phased", 0.6, 0.04, boundary=0.3)]]))
    assert len(rows[0]) == len(headers) and rows[0][:3] == ["phased", "4", "0.700 ± 0.141"]
    assert rows[0][-1] == "0.200 ± 0.141 (t = 0.5)"


@pytest.mark.parametrize("text, seeds", [("0-4", [0, 1, 2, 3, 4]), ("0,1,2", [0, 1, 2]), ("7", [7]),
                                         (" 3-4", [3, 4]), ("0-9", list(range(10)))])
def test_seed_list_accepts_ranges_and_lists(text, seeds):
    assert seed_list(text) == seeds


@pytest.mark.parametrize("text, message", [
    ("0-10", "names 11 seeds; at most 10"), ("0-999999999999", "at most 10"), ("4-0", "ends before it starts"),
    ("a", "is not a seed list"), ("0-1-2", "is not a seed list"), ("", "is not a seed list"),
    ("1,1", "repeats a seed"), ("-1", "must be at least 0"), ("2147483648", "must be at most 2147483647")])
def test_seed_list_refuses_bad_input_with_one_line(text, message):
    with pytest.raises(argparse.ArgumentTypeError, match=message) as error:
        seed_list(text)
    assert "\n" not in str(error.value)


def test_cli_seeds_prints_per_seed_rows_and_the_summary(capsys):
    assert main(["lab", "--method", "phased", "--modes", "3", "--iters", "2", "--batch", "32", "--fake-ratio", "1",
                 "--teacher-iters", "10", "--samples", "300", "--seeds", "0,1", "--json", "--threads", "1"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["seeds"] == [0, 1] and [[r["method"] for r in run] for run in out["runs"]] == [["phased"]] * 2
    (summary,) = out["summary"]
    assert summary["method"] == "phased" and summary["runs"] == 2 and set(summary["in_modes"]) == {"mean", "std"}
    assert main(["lab", "--method", "dmd", "--modes", "3", "--iters", "2", "--batch", "32", "--fake-ratio", "1",
                 "--teacher-iters", "10", "--samples", "300", "--seeds", "0-1", "--threads", "1"]) == 0
    table = capsys.readouterr().out
    assert "mean ± std over seeds 0, 1" in table and "| dmd | 1 |" in table and " ± " in table
