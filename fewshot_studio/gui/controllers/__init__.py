"""Controllers of the desktop app."""
