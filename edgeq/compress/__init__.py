"""Compression in PyTorch: modules that carry a QuantPlan's exact numbers, for every converter to lower."""
