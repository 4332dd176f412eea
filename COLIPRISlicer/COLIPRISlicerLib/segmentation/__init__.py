"""Segmentation head on frozen COLIPRI features: the network, its files, training data and the training loop."""
