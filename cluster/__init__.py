"""Running workflows on a Ray cluster: Ray Jobs submission and cluster configs."""
