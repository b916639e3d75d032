"""Measurement on top of the runtime: routing-trace replay (simulate), calibration (tune), bench, eval, profile."""
