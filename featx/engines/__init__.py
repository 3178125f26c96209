"""Engines that run extraction's decode and model stages elsewhere than in this process (optional extras)."""
