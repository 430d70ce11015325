"""From search scores to decisions: alignment check, calibration statistics, hysteresis."""
