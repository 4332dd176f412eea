"""Snippet -> slice: explicit references, landmarks, the anatomy prior, the localiser, its trainable head and evaluation."""
