"""Parallel layouts applied to a built model (TP, EP, CP, PP, ETP). Model code knows nothing of them."""
