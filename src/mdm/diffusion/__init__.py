"""Schedules, the multi-level forward process and samplers."""
