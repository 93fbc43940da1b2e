"""DoRA: discover and track objects in one long video to pretrain a ViT (Venkataramanan et al., ICLR 2024)."""

__version__ = "0.1.0"
