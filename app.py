"""Phased DMD Studio: ``python app.py [--host H] [--port P]`` (env PDMD_HOST / PDMD_PORT, or gradio's own)."""
from __future__ import annotations

import argparse
import os

from pdmd.limits import MAX_QUEUE
from pdmd.showcase import Showcase, ShowcaseError
from ui.inputs import redact


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default=os.environ.get("PDMD_HOST", os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1")),
                        help="interface to listen on (0.0.0.0 to accept other machines)")
    parser.add_argument("--port", type=int,
                        default=int(os.environ.get("PDMD_PORT", os.environ.get("GRADIO_SERVER_PORT", 7860))))
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    try:  # the showcase file is read before the interface's imports: a bad one stops the app in seconds
        showcase = Showcase.from_env()
    except ShowcaseError as err:
        raise SystemExit(f"app.py: showcase refused: {redact(str(err))}") from None
    from ui.app import build_app, launch_settings
    from ui.teacher_picker import LOAD_ERRORS
    try:
        app = build_app(showcase=showcase)
    except (ShowcaseError, *LOAD_ERRORS) as err:  # an invalid showcase file, or (load: eager) a model in it
        raise SystemExit(f"app.py: showcase refused: {redact(str(err))}") from None
    # a bounded queue: beyond MAX_QUEUE waiting requests a visitor is told the server is busy
    app.queue(max_size=MAX_QUEUE).launch(server_name=args.host, server_port=args.port, share=False,
                                         **launch_settings())


if __name__ == "__main__":
    main()
