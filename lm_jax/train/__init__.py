"""Training: sharded state, jitted steps, the pretraining and fine-tuning loops, image-text."""
