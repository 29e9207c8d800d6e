"""Concept discovery in vision and video transformers: VTCD (video concepts and their importance) and
VCC (the concept connectome across layers). Pure computation; the workflows live in ``workflows/``."""
