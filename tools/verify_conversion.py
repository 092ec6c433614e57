#!/usr/bin/env python
"""Compare our Megatron model with diffusers' on the same weights, at a parallel layout.

    torchrun --nproc-per-node N tools/verify_conversion.py --model wan|qwen-image --diffusers DIR \\
        [--subfolder transformer_2] --tp A --pp B --cp C [--sp] [--dtype fp32|bf16] [--rtol R] [--backward]

Ends with ``verify_conversion: max_rel_err=<value> PASS`` (exit 0) or ``FAIL`` (exit 1).
Inputs are seeded random: for Wan latents of --frames x --height x --width; for Qwen-Image packed
latents of --height x --width (2x2 patches) with --text-len text tokens, the last sample's last
--text-pad of them masked.
"""

import argparse
import sys

from megatron_adapters import verify


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    verify.add_arguments(parser)
    args = parser.parse_args()
    try:
        return verify.run(args)
    finally:
        from megatron_adapters.runtime.parallel import shutdown

        shutdown()


if __name__ == "__main__":
    sys.exit(main())
