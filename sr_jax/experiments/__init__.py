"""Experiment grids over many runs, and their reports (tables as markdown and CSV, plots as PNG)."""
