"""Dirty tracking: bitmaps, their crash-safe persistence, and the filter that marks them."""
