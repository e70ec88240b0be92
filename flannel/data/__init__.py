"""Chest X-ray data: readers for public layouts, label schemes, splits, audit, synthetic data."""
