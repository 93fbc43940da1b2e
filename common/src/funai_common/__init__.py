"""funai-common: the shared k-NN and Hummingbird evaluators and dataset loaders of the funai paper packages."""

from __future__ import annotations

__version__ = "0.1.0"
