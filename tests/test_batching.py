"""ui.batching.Batcher: requests of one key that wait while another runs go into the next call together, each
getting its own results; a lone request runs at once; a failing request fails alone."""
import threading
import time

import pytest

from ui.batching import Batcher


class Recorder:
    """A run function that records each batch and can hold its first call until released."""

    def __init__(self, hold_first: bool = False):
        self.batches, self.release, self.started = [], threading.Event(), threading.Event()
        if not hold_first:
            self.release.set()

    def __call__(self, key, rows, on_step=None):
        if on_step is not None:
            on_step(1, 1)
        self.batches.append((key, list(rows)))
        if len(self.batches) == 1:
            self.started.set()
            self.release.wait(10)
        if any(row == "bad" for row in rows):
            raise ValueError("a bad row")
        return [f"{key}:{row}" for row in rows]


def submit_all(batcher, requests):
    results, threads = {}, []
    for name, (key, rows) in requests.items():
        def target(name=name, key=key, rows=rows):
            try:
                results[name] = batcher.submit(key, rows)
            except ValueError as err:
                results[name] = err
        threads.append(threading.Thread(target=target))
        threads[-1].start()
    return results, threads


def wait_for_waiting(batcher, key, count):
    for _ in range(500):
        if len(batcher._waiting.get(key, ())) == count:
            return
        time.sleep(0.01)
    raise AssertionError(f"{count} requests never queued")


def test_a_lone_request_runs_at_once_with_its_own_rows():
    run = Recorder()
    batcher = Batcher(run, max_rows=8)
    assert batcher.submit("m", [1, 2]) == ["m:1", "m:2"]
    assert run.batches == [("m", [1, 2])] and batcher.calls == 1 and not batcher._busy


def test_requests_that_wait_behind_a_running_one_share_the_next_call_and_each_gets_its_own_part():
    run = Recorder(hold_first=True)
    batcher = Batcher(run, max_rows=8)
    first, threads = submit_all(batcher, {"first": ("m", [0])})
    assert run.started.wait(10)
    later, more = submit_all(batcher, {f"r{k}": ("m", [10 * k, 10 * k + 1]) for k in range(3)})
    other, others = submit_all(batcher, {"other": ("n", [5])})  # another model is not held up by this one
    for thread in others:
        thread.join(10)
    wait_for_waiting(batcher, "m", 3)
    run.release.set()
    for thread in threads + more:
        thread.join(10)
    assert first["first"] == ["m:0"] and other["other"] == ["n:5"]
    assert {name: rows for name, rows in later.items()} == {
        f"r{k}": [f"m:{10 * k}", f"m:{10 * k + 1}"] for k in range(3)}
    m_batches = [rows for key, rows in run.batches if key == "m"]
    assert len(m_batches) == 2 and sorted(m_batches[1]) == [0, 1, 10, 11, 20, 21]


def test_a_batch_holds_at_most_max_rows_and_a_bigger_request_runs_alone():
    run = Recorder(hold_first=True)
    batcher = Batcher(run, max_rows=4, size=lambda row: 1 + (row == 3))  # row 3 counts twice
    _, threads = submit_all(batcher, {"first": ("m", [0])})
    assert run.started.wait(10)
    results, more = submit_all(batcher, {"a": ("m", [1, 2]), "b": ("m", [3, 4]), "big": ("m", list(range(6)))})
    wait_for_waiting(batcher, "m", 3)
    run.release.set()
    for thread in threads + more:
        thread.join(10)
    assert [rows for _, rows in run.batches[1:]] == [[1, 2], [3, 4], list(range(6))]  # 2 + 3 > 4: a, b apart
    assert results["big"] == [f"m:{k}" for k in range(6)] and results["b"] == ["m:3", "m:4"]


def test_a_failing_request_fails_alone_and_nothing_is_left_waiting():
    run = Recorder(hold_first=True)
    batcher = Batcher(run, max_rows=8)
    _, threads = submit_all(batcher, {"first": ("m", [0])})
    assert run.started.wait(10)
    results, more = submit_all(batcher, {"good": ("m", [1]), "bad": ("m", ["bad"]), "fine": ("m", [2])})
    wait_for_waiting(batcher, "m", 3)
    run.release.set()
    for thread in threads + more:
        thread.join(10)
    assert results["good"] == ["m:1"] and results["fine"] == ["m:2"]
    assert isinstance(results["bad"], ValueError)
    assert not batcher._busy and not batcher._waiting
    with pytest.raises(ValueError, match="a bad row"):
        batcher.submit("m", ["bad"])


def test_progress_reaches_every_request_that_asked_for_it():
    run = Recorder()
    batcher = Batcher(run, max_rows=8)
    seen = []
    batcher.submit("m", [1], on_step=lambda done, total: seen.append((done, total)))
    assert seen == [(1, 1)]


def test_batches_of_one_lane_run_one_at_a_time_and_a_key_that_cannot_size_its_batch_fails_alone():
    running, most = [0], [0]
    guard = threading.Lock()

    def run(key, rows, on_step=None):
        with guard:
            running[0] += 1
            most[0] = max(most[0], running[0])
        time.sleep(0.05)
        with guard:
            running[0] -= 1
        return rows

    def max_rows(key):
        if key == "broken":
            raise ValueError("cannot load broken")
        return 8
    batcher = Batcher(run, max_rows=max_rows, lane=lambda key: "one lane")
    results, threads = submit_all(batcher, {f"k{k}": (f"model {k}", [k]) for k in range(4)})
    broken, more = submit_all(batcher, {"broken": ("broken", [0])})
    for thread in threads + more:
        thread.join(10)
    assert most[0] == 1 and results == {f"k{k}": [k] for k in range(4)}
    assert isinstance(broken["broken"], ValueError) and not batcher._busy and not batcher._waiting


def test_a_row_sampled_in_a_batch_equals_the_same_request_alone(tmp_path):
    """Through ui.comparison.sample_side's batch function: each row from its own seed's noise, whatever its company
    (a teacher side with CFG and a student side with boundary states)."""
    from ui_fixtures import make_student

    from pdmd.core.schedule import PhaseSchedule
    from ui.comparison import Row, _sample_side, student_side, teacher_side
    from ui.models import ModelStore

    store = ModelStore()
    rows = [Row(("a red star on a dark background",), 0), Row(("a blue circle on a light background",) * 2, 7),
            Row(("a green square on a grey background",), 123)]
    student = make_student(tmp_path / "student")
    for side in (teacher_side(store, "builtin", {}, PhaseSchedule.uniform(4, 1.0), 3.0),
                 student_side(store, student, PhaseSchedule((0.5,), (1, 1), 1.0))):
        together = _sample_side(side, rows)
        for row, batched in zip(rows, together):
            (alone,) = _sample_side(side, [row])
            assert batched.pictures.shape == alone.pictures.shape == (len(row[0]), 3, 32, 32)
            assert (batched.pictures - alone.pictures).abs().max() < 1e-4  # float rounding; a display level is 4e-3
            assert [s.t for s in batched.states] == [s.t for s in alone.states] == list(side.boundaries)
    assert not (together[0].pictures[0] - together[2].pictures[0]).abs().max() < 1e-3  # rows do differ


def test_a_background_batch_pauses_between_steps_while_a_foreground_request_runs():
    order, foreground_running, background_stepping = [], threading.Event(), threading.Event()
    release_foreground = threading.Event()

    def run(key, rows, on_step=None):
        if key == "teacher":
            for step in range(3):
                on_step(step, 3)
                order.append(f"teacher step {step}")
                background_stepping.set()
        else:
            foreground_running.set()
            release_foreground.wait(10)
            order.append("student")
        return [f"{key}:{row}" for row in rows]

    batcher = Batcher(run, max_rows=8, lane=lambda key: key, background=lambda key: key == "teacher")
    student, _ = submit_all(batcher, {"s": ("student", [1])})
    assert foreground_running.wait(10)
    teacher, threads = submit_all(batcher, {"t": ("teacher", [2])})
    time.sleep(0.2)  # the teacher's batch has started and sits at its first step
    assert not background_stepping.is_set() and order == []
    release_foreground.set()
    for thread in threads:
        thread.join(10)
    assert order == ["student", "teacher step 0", "teacher step 1", "teacher step 2"]
    assert student == {"s": ["student:1"]} and teacher == {"t": ["teacher:2"]}


def test_a_background_batch_without_listeners_runs_through_when_no_foreground_request_is_there():
    steps = []

    def run(key, rows, on_step):  # a background batch always gets a step hook, listeners or not
        for step in range(2):
            on_step(step, 2)
            steps.append(step)
        return rows
    batcher = Batcher(run, max_rows=8, background=lambda key: True)
    assert batcher.submit("teacher", [5]) == [5] and steps == [0, 1]
