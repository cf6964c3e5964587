"""Data helpers: batch structures and the embedded digits dataset."""
