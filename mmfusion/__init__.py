"""mmfusion: raw image-text data to a registered, evaluated multimodal fusion model."""

__version__ = "0.1.0"
