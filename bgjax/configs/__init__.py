"""Experiment configs, one `get_config(arg)` file each (big_vision style).

`--config synthetic.py:arch=vit` names one of them. A package so that a wheel ships them; commands
load them by file (`config_utils.resolve_config`), not by import.
"""
