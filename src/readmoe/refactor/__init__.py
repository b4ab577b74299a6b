"""Refactoring a dense model into a ReadME MoE: statistics, expert plans, slicing."""
