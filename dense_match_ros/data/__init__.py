"""Data sets: synthetic training pairs, shared real evaluation data, pair lists."""
