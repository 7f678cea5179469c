"""imem: emotion-based image-music matching in valence-arousal space."""

__version__ = "0.1.0"
