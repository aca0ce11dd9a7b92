"""`make bench`: each stage against a bare baseline measured in the same run (ratios, medians of repeats)."""
