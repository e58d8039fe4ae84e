"""Calibration: observers (range estimators) and calibration data (raw files, images, arrays)."""
