"""Layer 0: utilities every other layer may use (errors, progress, atomic folders and JSON, hardware)."""
