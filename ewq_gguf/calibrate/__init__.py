"""CALIBRATE: measurements on real text that the calibration-driven plans (LIM, optimal) and --imatrix use."""
from .calibration import Calibration, Sensitivity, imatrix_path_for, is_calibration_file, load_importance
from .engine import calibrate

__all__ = ["Calibration", "Sensitivity", "calibrate", "imatrix_path_for", "is_calibration_file", "load_importance"]
