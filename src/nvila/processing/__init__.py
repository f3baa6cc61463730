"""Layer 2 (beside the model): media files, tiling plans, pixels and prompts; never imports the model."""
