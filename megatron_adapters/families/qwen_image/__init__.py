"""Qwen-Image (diffusers' QwenImageTransformer2DModel) as Megatron-core modules."""
