"""Draft report: the sentence bank, the evidence-to-text builder, the composer, and report metrics."""
