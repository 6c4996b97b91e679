"""CALIBRATE: measurements on real text that the calibration-driven plans (LIM, optimal) and --imatrix use."""
from .calibration import Calibration, Sensitivity, imatrix_path_for, is_calibration_file, load_importance
from .engine import CalibrationWarning, calibrate

__all__ = ["Calibration", "CalibrationWarning", "Sensitivity", "calibrate", "imatrix_path_for", "is_calibration_file",
           "load_importance"]
