"""NeCo: patch neighbour consistency post-pretraining (Pariza et al., ICLR 2025)."""

__version__ = "0.1.0"
