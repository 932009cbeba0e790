"""Compare-tab latency of a live app, measured through its public API on localhost.

    python benchmarks/app_latency.py --student runs/.../student          # starts app.py on a free port
    python benchmarks/app_latency.py --url http://127.0.0.1:7860/ --student ...
    python benchmarks/app_latency.py --client gradio --student ...     # gradio_client's visitors instead

The visitors share this machine's cores with the server. ``--client rest`` (the default) calls gradio's REST
endpoints (POST /gradio_api/call/NAME, then its event stream) with the standard library, a few milliseconds of
CPU a call, the way a remote visitor costs the server nothing but the server's own work; gradio_client's
visitors (``--client gradio``: a thread, an SSE reader and a download of every image per call) take about a
second of these 2 cores per 20 calls themselves (benchmarks/gradio_floor.py).

1. sequential: N Compare clicks, each the student event (its images on screen) then the teacher event;
2. concurrent: C clients at once, each one full Compare; all must succeed.
Prints one JSON object with p50/p95 of each.
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlsplit
from pathlib import Path

from gradio_client import Client

from pdmd.paths import ROOT

PROMPTS = ["a red star on a dark background", "a blue circle on a light background",
           "a yellow triangle on a sky background", "a green square on a grey background"]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def summary(values: list[float]) -> dict:
    return {"n": len(values), "p50_s": round(statistics.median(values), 3), "p95_s": round(percentile(values, 0.95), 3),
            "max_s": round(max(values), 3)}


class RestClient:
    """One visitor (one session) over gradio's REST API: ``predict(*data, api_name="/name")`` -> the outputs."""

    def __init__(self, url: str):
        parts = urlsplit(url)
        self.host, self.port = parts.hostname, parts.port or 80
        self.session_hash = uuid.uuid4().hex[:11]
        config = json.load(self._request("GET", "/config"))
        components = {component["id"]: component for component in config["components"]}
        # each API event's inputs as the server wants them: session State slots (the server fills them) and
        # the named parameters, whose defaults stand where a call gives fewer values (as gradio_client does)
        self.inputs = {event["api_name"]: [(components[i]["type"] == "state", components[i]["props"].get("value"))
                                           for i in event["inputs"]]
                       for event in config["dependencies"] if event.get("api_name")}

    def _request(self, method: str, path: str, body: dict | None = None) -> http.client.HTTPResponse:
        connection = http.client.HTTPConnection(self.host, self.port, timeout=600)
        connection.request(method, path, body=None if body is None else json.dumps(body),
                           headers={"Content-Type": "application/json"})
        response = connection.getresponse()
        if response.status != 200:
            raise RuntimeError(f"{method} {path}: HTTP {response.status} {response.read()[:200]!r}")
        return response

    def predict(self, *data, api_name: str) -> list:
        name, given, values = api_name.lstrip("/"), iter(data), []
        for is_state, default in self.inputs[name]:
            values.append(None if is_state else next(given, default))
        event_id = json.load(self._request("POST", f"/gradio_api/call/{name}",
                                           {"data": values, "session_hash": self.session_hash}))["event_id"]
        stream, event = self._request("GET", f"/gradio_api/call/{name}/{event_id}"), None
        for line in stream:  # server-sent events: "event: NAME" then "data: JSON"
            line = line.decode().strip()
            if line.startswith("event:"):
                event = line.split(":", 1)[1].strip()
            elif line.startswith("data:") and event in ("complete", "error"):
                payload = json.loads(line.split(":", 1)[1])
                if event == "error":
                    raise RuntimeError(f"{api_name}: {payload}")
                return payload
        raise RuntimeError(f"{api_name}: the event stream ended without a result")


def _captioned(outputs) -> bool:
    """A side's outputs hold its caption ("… NFE n, s seconds") when it ran; an error line otherwise."""
    return any(isinstance(value, str) and "NFE" in value for value in outputs)


def compare_once(client: Client | RestClient, student: str, index: int) -> tuple[float, float]:
    """One Compare click: seconds until the student's image arrives, then until the teacher's."""
    start = time.perf_counter()
    student_out = client.predict(PROMPTS[index % len(PROMPTS)], index, False, student, "as trained", 3.0,
                                 api_name="/compare_student")
    student_seconds = time.perf_counter() - start
    if not _captioned(student_out):
        raise RuntimeError(f"student step failed: {student_out}")
    teacher_out = client.predict(32, 3.0, api_name="/compare_teacher")
    if not _captioned(teacher_out):
        raise RuntimeError(f"teacher step failed: {teacher_out}")
    return student_seconds, time.perf_counter() - start


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_app(runs_dir: str | None) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False"}
    if runs_dir:
        env["PDMD_RUNS_DIR"] = runs_dir
    server = subprocess.Popen([sys.executable, "app.py", "--port", str(port)], cwd=ROOT, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/"
    for _ in range(240):
        try:
            urllib.request.urlopen(url, timeout=2)
            return server, url
        except OSError:
            time.sleep(0.5)
    server.terminate()
    raise TimeoutError("the app did not start within 2 minutes")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", help="a running app; default: start app.py on a free port")
    parser.add_argument("--student", required=True, help="student folder as the picker lists it, or 'baseline'")
    parser.add_argument("--runs-dir", help="PDMD_RUNS_DIR for the started app")
    parser.add_argument("--clicks", type=int, default=20)
    parser.add_argument("--concurrent", type=int, default=10)
    parser.add_argument("--client", choices=("rest", "gradio"), default="rest",
                        help="the visitors: gradio's REST API with the standard library, or gradio_client")
    args = parser.parse_args()
    visitor = RestClient if args.client == "rest" else lambda url: Client(url, verbose=False)
    student = args.student if args.student == "baseline" else str(Path(args.student).resolve())
    server, url = (None, args.url) if args.url else start_app(args.runs_dir)
    try:
        client = visitor(url)
        compare_once(client, student, 0)  # warm-up: loads the student
        sequential = [compare_once(client, student, i) for i in range(args.clicks)]
        started = time.perf_counter()
        with ThreadPoolExecutor(args.concurrent) as pool:
            clients = [visitor(url) for _ in range(args.concurrent)]
            concurrent = list(pool.map(lambda i: compare_once(clients[i], student, i), range(args.concurrent)))
        wall = time.perf_counter() - started
    finally:
        if server:
            server.terminate()
            server.wait(timeout=30)
    print(json.dumps({
        "client": args.client,
        "student_images": summary([s for s, _ in sequential]),
        "full_compare_incl_teacher": summary([t for _, t in sequential]),
        "teacher_after_student": summary([t - s for s, t in sequential]),
        "concurrent": {"clients": args.concurrent, "succeeded": len(concurrent), "wall_s": round(wall, 2),
                       "student_images": summary([s for s, _ in concurrent]),
                       "full_compare": summary([t for _, t in concurrent])},
    }, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
