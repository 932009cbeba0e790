import json
import subprocess
import sys
from pathlib import Path

import pytest

from pdmd.cli import main

REPO = Path(__file__).resolve().parents[1]


def test_eval_json_prints_one_object_with_the_metrics():
    completed = subprocess.run(
        [sys.executable, "-m", "pdmd", "eval", "--model", "builtin", "--steps", "2", "--cfg", "3", "--seed", "0",
         "--prompts", "2", "--per-prompt", "3", "--json"],
        cwd=REPO, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr
    result = json.loads(completed.stdout)  # the whole of stdout is one JSON object
    assert {"adherence", "diversity", "fd", "nfe", "seconds", "images"} <= set(result)
    assert result["images"] == 6
    assert result["nfe"] == 4  # 2 steps, each a conditional and an unconditional evaluation
    assert 0 <= result["adherence"] <= 1 and result["diversity"] >= 0 and result["seconds"] > 0


@pytest.mark.parametrize("arguments, complaint", [
    (["--model", "no-such-model"], "--model"),
    (["--steps", "0"], "--steps"),
    (["--steps", "-4"], "--steps"),
    (["--steps", "many"], "--steps"),
    (["--cfg", "-1"], "--cfg"),
    (["--prompt", "a red blue circle"], "--prompt"),
])
def test_bad_eval_input_is_a_clear_usage_error(arguments, complaint, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", *arguments])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert "python -m pdmd eval: error:" in error and complaint in error
