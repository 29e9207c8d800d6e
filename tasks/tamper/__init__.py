"""Tamper-resistance benchmark (TamperBench-style): world, attacks, defenses, judges, utility, aggregation."""
