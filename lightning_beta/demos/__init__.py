"""Bundled-data workloads and the demo (needs the ``demo`` extra: scikit-learn's handwritten digits)."""
