"""Snippet -> slice: explicit references, the coarse anatomy grid, body and lung masks, the airway,
landmarks, the anatomy prior, the localiser, its trainable head and evaluation."""
