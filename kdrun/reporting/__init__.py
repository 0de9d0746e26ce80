"""A run's numbers made readable: evaluation report, figures, sweep summary and heatmaps, exports."""
