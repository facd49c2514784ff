"""Experiments on top of oneword: paper figures, the offline shapes world."""
