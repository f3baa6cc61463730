"""Layer 1: what files and plans look like (typed config, checkpoint layout names, plan types, quantization spec)."""
