"""Autotuning of kernel schedules (MetaSchedule, device farm)."""
