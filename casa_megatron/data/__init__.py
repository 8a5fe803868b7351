"""Data: image processing into patches, and (for now) a generated visual-question task."""
