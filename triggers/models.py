"""Triggers (schedules, events, API calls) and backfills arrive with the triggers issue."""
