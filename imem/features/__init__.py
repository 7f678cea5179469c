"""Per-clip audio features for the music encoder."""
