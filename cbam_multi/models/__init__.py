"""Framework-free model specs and their float64 NumPy oracles, one file per family."""
