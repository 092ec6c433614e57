#!/usr/bin/env python
"""Export a finished Phased DMD run as a diffusers pipeline that reproduces `pdmd sample` (docs/export.md).

    python tools/convert_to_diffusers.py --run RUN_DIR --out OUT [--base-pipeline DIR] [--lora-only]
        [--dtype fp32|bf16] [--teacher DIR] [--verify]
    torchrun --nproc-per-node N tools/convert_to_diffusers.py --run-dir RUN_DIR ... --tp N   # too big for one process

(under torchrun spell --run as --run-dir: torchrun's own parser takes --run as an abbreviation of --run-path)

Exit codes: 0 done (and --verify passed), 1 --verify failed, 2 the run cannot be exported as asked.
"""

import sys

from pdmd.export.convert import main

if __name__ == "__main__":
    try:
        sys.exit(main())
    finally:
        from megatron_adapters.runtime.parallel import shutdown

        shutdown()
