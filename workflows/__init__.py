"""The DAG layer: the engine and one module per research workflow."""
