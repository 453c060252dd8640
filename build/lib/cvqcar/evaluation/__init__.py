"""Evaluation: FID Inception, Frechet distance, metric accumulation."""
