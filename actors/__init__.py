"""Stateful Ray actors that hold models."""
