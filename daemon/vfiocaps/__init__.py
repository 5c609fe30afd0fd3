"""vfiocaps: probe VFIO devices once for display, GL and migration, cache the truth, serve it."""

__version__ = "0.1.0"
