"""Data for calibration and validation: sources and a seeded, disjoint split."""
