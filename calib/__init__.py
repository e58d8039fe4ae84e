"""Input data for calibration, diff, hessian and run: raw camera files (rawpy), DNG writing, images, arrays."""
