"""The `meshtron` command: one subcommand per module in this folder (`train`, `plan`, ...).

Each subcommand module defines `add_arguments(parser)` and `run(args) -> int`, and keeps its heavy
imports inside `run`, so `meshtron --help` stays fast.
"""
from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = {
    "train": "train a model on a mesh (starts the ranks itself, or runs under torchrun)",
    "generate": "generate text from a checkpoint or Hugging Face folder, tensor-parallel with a KV cache",
    "serve": "serve an OpenAI-compatible completions API from a checkpoint or Hugging Face folder",
    "eval": "loss and perplexity of a trained model on any text",
    "convert": "convert a Hugging Face GPT-2 or Llama folder into a meshtron checkpoint",
    "export": "export a meshtron checkpoint as a Hugging Face folder",
    "plot": "write PNG plots of a run's training and validation loss and throughput",
    "plan": "choose a mesh for a model and a cluster, predicting memory and step time",
    "calibrate": "measure this machine for the planner's cpu profile (cached)",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="meshtron", description="Hybrid data x model parallel transformers "
                                     "on a named device mesh.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, help_text in COMMANDS.items():
        module = importlib.import_module(f"meshtron.cli.{name}")
        p = sub.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 2
    module = importlib.import_module(f"meshtron.cli.{args.command}")
    return int(module.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
