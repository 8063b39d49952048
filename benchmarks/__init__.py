"""Reproducible benchmarks of hf_vitprune (not part of the installed package); run ``python -m benchmarks.run``."""
