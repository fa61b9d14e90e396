"""The embedded demos: tiny models trained on the CPU, their configs."""
