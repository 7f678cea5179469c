"""Corpus loading, the embedded corpus generator and dataset preparation."""
