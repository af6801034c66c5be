"""Digits models of the zoo (being written)."""
