"""The offline sweep agent behind sweep.py, one concern per module (see sweep.py for how to use it)."""
