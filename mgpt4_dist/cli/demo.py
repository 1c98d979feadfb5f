"""`mgpt4-demo`: the web chat demo (gradio) for a model folder, on this machine's browser port.

    mgpt4-demo --model exported/                        # http://127.0.0.1:7860
    mgpt4-demo --model exported/ --host 0.0.0.0 --port 8080 --dtype bf16

Needs the `demo` extra (pip install 'mgpt4_dist[demo]'); works offline.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import List, Optional

from mgpt4_dist.cli import ArgumentParser, examples, user_errors
from mgpt4_dist.cli.chat import add_generation_arguments, add_model_arguments, load_model_from_args
from mgpt4_dist.errors import InvalidInputError

PROG = "mgpt4-demo"


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog=PROG,
        description="Serve a web page to chat with MiniGPT-4 about an uploaded image (gradio; streamed answers, "
                    "stop and reset, temperature/beams/max-new-tokens controls) and an /answer API for "
                    "gradio_client. Loads the folders mgpt4-chat loads.",
        epilog=examples("mgpt4-demo --model exported/",
                        "mgpt4-demo --model exported/ --host 0.0.0.0 --port 8080 --dtype bf16",
                        "mgpt4-demo --model exported/ --quantization 4bit   # one CUDA GPU, bitsandbytes"))
    p.add_argument("--model", required=True, help="model folder (as mgpt4-chat --model)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=7860, help="port to listen on")
    add_generation_arguments(p)  # the controls' starting values; /answer uses max-new-tokens and beams
    p.add_argument("--seed", type=int, default=0, help="seed for sampling (set once at start)")
    add_model_arguments(p)
    return p


def check_can_serve(host: str, port: int, url: str) -> None:
    """Refuse a bad port, or an address this machine cannot listen on, before the model loads."""
    import socket

    if not 0 < port < 65536:
        raise InvalidInputError(f"--port {port}: use 1..65535")
    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server binds: TIME_WAIT is no obstacle
            probe.bind((host, port))
    except OSError as e:
        raise InvalidInputError(f"cannot serve at {url}: {e.strerror or e}; pick another --port or --host") from None


@user_errors(PROG)
def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    url = f"http://{args.host}:{args.port}"
    check_can_serve(args.host, args.port, url)
    from mgpt4_dist.inference.demo import GenerationSettings, build_demo, import_gradio, launch_demo

    import_gradio()  # refuse before the (slow) model load when the extra is missing
    import torch
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    bundle = load_model_from_args(args)
    torch.manual_seed(args.seed)
    settings = GenerationSettings(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                  num_beams=args.num_beams)
    demo = build_demo(bundle, os.path.basename(os.path.normpath(args.model)), settings)
    print(f"{PROG}: serving {args.model} on {bundle.device} at {url} (Ctrl-C stops)", flush=True)
    try:
        launch_demo(demo, host=args.host, port=args.port)
    except OSError as e:  # gradio reports a taken port or an address it cannot bind as OSError
        raise InvalidInputError(f"cannot serve at {url}: {e}; pick another --port or --host") from None
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
