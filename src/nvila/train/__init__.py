"""Training (layer above the builders): datasets, mixtures, packing, the loss, recipes and the resumable runner."""
