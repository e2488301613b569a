"""Calibration and evaluation text: datasets -> token windows."""
