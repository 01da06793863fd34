"""Functional ops. Each has a plain-torch reference that runs on CPU and defines the result."""
