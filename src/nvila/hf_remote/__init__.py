"""Remote code of the "-hf" folders: self-contained files (no nvila imports) copied into converted checkpoints."""
