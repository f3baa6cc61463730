"""Evaluation: dataset adapters (a registry) and exact-match / VQA accuracy through nvila.api."""
