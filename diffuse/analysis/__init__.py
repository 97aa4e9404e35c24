"""Training analyses (seed 001): gradient norms by corruption level, and heatmaps of them."""
