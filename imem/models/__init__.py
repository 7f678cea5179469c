"""Neural encoders for images and music (BEATs, ...)."""
