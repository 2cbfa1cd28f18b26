"""Conformance suite: proves implementations of SPEC.md return identical placements."""
