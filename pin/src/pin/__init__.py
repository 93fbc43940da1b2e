"""PIN: a positional insert that unlocks object localisation in a frozen VLM (Dorkenwald et al., CVPR 2024)."""

__version__ = "0.1.0"
