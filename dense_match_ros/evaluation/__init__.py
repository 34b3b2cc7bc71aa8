"""Offline evaluation: the dense-match-eval CLI, its figures, and pose benchmarks."""
