"""phased-dmd: Phased DMD distillation of flow-matching diffusion transformers.

The method lives here and never imports Megatron; networks come from ``megatron_adapters``.
"""

__version__ = "0.1.0"
