"""mugs.configs."""
