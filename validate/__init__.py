"""Validation: run artifacts in their real runtimes and measure drift. Importable without torch."""
