"""Model lifecycle: models found in directories, engines launched on demand, swapped under a GPU memory
budget (docs/lifecycle.md)."""
