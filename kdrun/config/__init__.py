"""Checks of the composed config: every user-facing value, before any work starts."""
