"""The method comparison: `compare.py` runs it (one command, resumable), `aggregate.py` turns its per-run JSON
files into the results table."""
