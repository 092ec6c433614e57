"""Wan2.x DiT (diffusers' WanTransformer3DModel) as Megatron-core modules."""
