"""The training loop and what it needs: runtime (device, AMP), optimizers, training state, teacher sources."""
