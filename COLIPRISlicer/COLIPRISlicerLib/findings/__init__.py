"""Findings: the catalogue, zero-shot scores from embeddings, heatmaps and peaks, and calibration against labels."""
