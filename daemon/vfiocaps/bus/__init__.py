"""The D-Bus adaptor: a thin layer that serves the engine's knowledge and knows nothing else."""
