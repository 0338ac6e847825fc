"""Alchemist: meta-gradient data selection for text-to-image training (arXiv 2512.16905)."""
