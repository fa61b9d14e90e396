"""A run: its config, its state file, its run directory, and the scoring of a model on a split."""
