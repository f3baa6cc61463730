"""Layer 2 (beside processing): tensors in, tensors out: vision tower, projectors, S2, TSP, fusion, quantized linears."""
