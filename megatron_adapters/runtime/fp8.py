"""FP8 through Transformer Engine: the autocast a role's blocks run under, from that role's config."""

from __future__ import annotations

import contextlib


def fp8_context(config):
    """TE's FP8 autocast with the config's recipe (Megatron's own helper) when the role was built with
    ``fp8`` set; a no-op otherwise. Only TE linears change: norms, attention and the embeddings/head
    stay in the model dtype."""
    if not getattr(config, "fp8", None):
        return contextlib.nullcontext()
    from megatron.core.fp8_utils import get_fp8_context

    return get_fp8_context(config)
