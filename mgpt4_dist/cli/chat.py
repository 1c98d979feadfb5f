"""`mgpt4-chat`: talk to a consolidated model about one image.

    mgpt4-chat --model exported/ --image cat.jpg --prompt "What is in the picture?"   # one answer
    mgpt4-chat --model exported/ --image cat.jpg                                      # interactive

Interactive mode keeps the conversation (the original demo's template) until an empty line,
`/quit` or end of input (Ctrl-D); `/reset` starts over with the same image.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import List, Optional

from mgpt4_dist.cli import ArgumentParser, examples, user_errors

PROG = "mgpt4-chat"


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog=PROG,
        description="Chat with MiniGPT-4 about an image: a folder written by mgpt4-consolidate, one answer with "
                    "--prompt, else an interactive session (empty line, /quit or Ctrl-D ends; /reset starts over).",
        epilog=examples("mgpt4-chat --model exported/ --image cat.jpg --prompt 'What is in the picture?'",
                        "mgpt4-chat --model exported/ --image cat.jpg --temperature 0   # interactive, greedy"))
    p.add_argument("--model", required=True, help="folder written by mgpt4-consolidate or mgpt4-export --format hf "
                                                   "(not a training step folder)")
    p.add_argument("--image", required=True, help="image file")
    p.add_argument("--prompt", default=None, help="answer this one question and exit (default: interactive)")
    add_generation_arguments(p)
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    add_model_arguments(p)
    return p


def add_generation_arguments(p: argparse.ArgumentParser) -> None:
    """--max-new-tokens, --temperature, --num-beams (mgpt4-demo's defaults for its controls too)."""
    p.add_argument("--max-new-tokens", type=int, default=300, help="longest answer in tokens")
    p.add_argument("--temperature", type=float, default=1.0, help="0 = greedy (deterministic)")
    p.add_argument("--num-beams", type=int, default=1, help="beam search width")


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    """How the model is placed and where its frozen weights are (shared with mgpt4-demo)."""
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda when available, else cpu)")
    p.add_argument("--dtype", default=None, help="fp32 | fp16 | bf16 (default: fp16 on CUDA, fp32 on CPU)")
    p.add_argument("--quantization", choices=("none", "8bit", "4bit"), default="none",
                   help="LLM weights in 8/4 bit (bitsandbytes, CUDA only)")
    p.add_argument("--llm-path", default=None, help="override model.llm_path of the folder's config")
    p.add_argument("--vit-checkpoint", default=None, help="override model.vit_checkpoint")
    p.add_argument("--qformer-checkpoint", default=None, help="override model.qformer_checkpoint")


def load_model_from_args(args: argparse.Namespace):
    """The model of `--model`, placed as add_model_arguments' flags say (a LoadedModel)."""
    import torch

    from mgpt4_dist.inference import load_model

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    return load_model(args.model, device=device, dtype=args.dtype, quantization=args.quantization,
                      llm_path=args.llm_path, vit_checkpoint=args.vit_checkpoint,
                      qformer_checkpoint=args.qformer_checkpoint)


@user_errors(PROG)
def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    import torch
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    from mgpt4_dist.inference import Chat, ImageError

    gen = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, num_beams=args.num_beams)
    if not os.path.isfile(args.image):  # fail before the (slow) model load
        raise ImageError(f"image not found: {args.image}")
    bundle = load_model_from_args(args)
    torch.manual_seed(args.seed)
    chat = Chat(bundle)
    chat.upload_image(args.image)
    if args.prompt is not None:
        print(chat.ask(args.prompt, **gen), flush=True)
        return 0
    print(f"MiniGPT-4 ({bundle.conversation} template) is looking at {args.image}. "
          f"Ask a question; empty line, /quit or Ctrl-D ends, /reset starts over.", flush=True)
    while True:
        try:
            # The prompt goes to stdout: input() would send it to stderr when on a terminal.
            print("You: ", end="", flush=True)
            question = input()
        except (EOFError, KeyboardInterrupt):
            print()
            break
        question = question.strip()
        if not question or question == "/quit":
            break
        if question == "/reset":
            chat = Chat(bundle)
            chat.upload_image(args.image)
            print("(conversation reset)", flush=True)
            continue
        print(f"Assistant: {chat.ask(question, **gen)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
