"""din-ray: the Deep Interest Network (Zhou et al., KDD 2018) trained, tuned and served on Ray."""

__version__ = "0.1.0"
