"""UnCounTR (Knobel, Han, Asano, CVPR 2024): class-agnostic counting learnt from self-collages, without annotations."""

__version__ = "0.1.0"

DENSITY_SCALING = 3000.0
"""Density mass per object (the reference's ``density_scaling``): count = density.sum() / DENSITY_SCALING."""
