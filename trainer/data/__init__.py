"""Data sets that need no download: real data that packages ship, or generated data."""
