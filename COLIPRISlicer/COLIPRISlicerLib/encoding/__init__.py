"""Encoding: one image forward pass (pooled + dense patch grid), prompt embeddings, their caches, and the engine holding them."""
