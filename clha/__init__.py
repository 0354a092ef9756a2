"""CLHA: a contrastive learning framework for human alignment (LREC-COLING 2024), with its baselines."""

__version__ = "0.1.0"
