"""microdit: MicroDiT diffusion transformers trained on a micro-budget."""
