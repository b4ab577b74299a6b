"""Bridges from ReadME model folders to other serving engines (each in its own environment)."""
