"""readmoe: Read-ME (NeurIPS 2024): refactor a dense LLM into a router-decoupled MoE, serve it."""

__version__ = "0.1.0"
