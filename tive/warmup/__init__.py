"""Stage 3, the warm-up: the LoRA reference model trained briefly on the mixture."""
