"""Training: state, losses, train and evaluation steps, the loop and checkpoints."""
