"""mugs.model."""
