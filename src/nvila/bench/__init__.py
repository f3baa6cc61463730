"""Benchmarks of inference setups (``nvila bench``): timing (timing.py), reports (report.py), the run (run.py)."""
