"""Sweep configs for `bgjax sweep --config sweeps/<name>.py`."""
