"""edge_effnet: EfficientNet from the paper to the device."""

__version__ = "0.1.0"
