"""Few-step diffusion distillation: configs, methods, model adapters and the trainer."""
