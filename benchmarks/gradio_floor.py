"""Gradio's own round trip under concurrent visitors: the floor under any handler of the app.

    python benchmarks/gradio_floor.py                 # an image + caption endpoint that computes nothing
    python benchmarks/gradio_floor.py --text-only     # the caption alone
    python benchmarks/gradio_floor.py --client gradio # gradio_client's visitors instead of REST calls

Starts a one-event gradio app (the Compare student event's shape: a prompt and a seed in, a 256x256 image and a
caption out, the same queue settings) in its own process, then times C gradio_client visitors at once, the way
benchmarks/app_latency.py times the real app, and counts the server process's CPU seconds per visitor (the
clients share the machine's cores; on a Space they do not). Prints one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

sys.path.insert(0, os.path.dirname(__file__))
from app_latency import RestClient, free_port, summary


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far (Linux /proc): the server's share of the machine, apart from
    the benchmark's own clients on the same cores."""
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def serve(port: int, text_only: bool) -> None:
    import gradio as gr
    import numpy as np
    from PIL import Image

    from pdmd.limits import MAX_QUEUE, SAMPLE_SLOTS

    picture = Image.fromarray((np.random.default_rng(0).random((256, 256, 3)) * 255).astype("uint8"))

    def student(prompt, seed):
        return (None if text_only else picture), f"**Student** — {prompt}, seed {seed}"

    with gr.Blocks() as demo:
        prompt, seed, run = gr.Textbox(), gr.Number(), gr.Button()
        image, caption = gr.Image(), gr.Markdown()
        run.click(student, [prompt, seed], [image, caption], api_name="student", concurrency_limit=SAMPLE_SLOTS)
    demo.queue(max_size=MAX_QUEUE).launch(server_port=port)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrent", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--text-only", action="store_true", help="no image in the answer")
    parser.add_argument("--client", choices=("rest", "gradio"), default="rest",
                        help="the visitors: gradio's REST API with the standard library, or gradio_client")
    parser.add_argument("--serve", type=int, help=argparse.SUPPRESS)  # the server process's port
    args = parser.parse_args()
    if args.serve:
        serve(args.serve, args.text_only)
        return 0

    from gradio_client import Client

    port = free_port()
    server = subprocess.Popen([sys.executable, __file__, "--serve", str(port)] + ["--text-only"] * args.text_only,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/"
    try:
        for _ in range(240):
            try:
                urllib.request.urlopen(url, timeout=2)
                break
            except OSError:
                time.sleep(0.5)
        clients = [RestClient(url) if args.client == "rest" else Client(url, verbose=False)
                   for _ in range(args.concurrent)]

        def once(index: int) -> float:
            started = time.perf_counter()
            clients[index].predict("a red star", index, api_name="/student")
            return time.perf_counter() - started

        once(0)  # warm-up
        alone = [once(0) for _ in range(5)]
        together = []
        server_cpu = cpu_seconds(server.pid)
        for _ in range(args.rounds):
            with ThreadPoolExecutor(args.concurrent) as pool:
                together += list(pool.map(once, range(args.concurrent)))
        server_cpu = cpu_seconds(server.pid) - server_cpu
    finally:
        server.terminate()
        server.wait(timeout=30)
    print(json.dumps({"client": args.client, "answer": "caption" if args.text_only else "256x256 image + caption",
                      "alone": summary(alone), f"{args.concurrent}_at_once": summary(together),
                      "server_cpu_s_per_visitor": round(server_cpu / len(together), 3)}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
