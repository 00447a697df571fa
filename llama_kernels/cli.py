"""The ``llama-kernels`` command.

    llama-kernels bench [--quick] [--out DIR] [--ops rms_norm,rope] [--no-plot]
    llama-kernels validate [--config CodeLlama-7b] [--checkpoint DIR] [--tokens 64] [--new-tokens 32]
"""

from __future__ import annotations

import argparse
import sys

from .bench import add_arguments, run_from_args
from .models import validate


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="llama-kernels", description="Fused Triton kernels for Code Llama.")
    commands = parser.add_subparsers(dest="command", required=True)
    bench = commands.add_parser("bench", help="time the ops against their peers (= python -m llama_kernels.bench)")
    add_arguments(bench)
    bench.set_defaults(run=run_from_args)
    check = commands.add_parser("validate", help="the Code Llama model on the kernels against the reference")
    validate.add_arguments(check)
    check.set_defaults(run=validate.run_from_args)
    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
