"""torch-recal: five published training tricks as drop-in pieces for your own PyTorch models.

* :class:`ResponseCalibration`, :func:`calibrate` (ResCNet, arXiv 2411.13582)
* :class:`GenerativeGradientLoss`, :class:`ReferenceDecoder`, :func:`first_layer_filter_stats`
  (GGR, Reza & Jung, IEEE Access 2025, doi 10.1109/ACCESS.2025.3534216)
* :class:`RifleScheduler`, :func:`find_classifier` (RIFLE, arXiv 2007.03349)
* :func:`pinv_refit_dense`, :class:`NormalEquations`, :class:`RandomLayerTraining` (fast
  retraining, arXiv 2008.07387)
* :class:`CoherentStrongReg` with its criteria :class:`DescentGate`, :class:`RatioRule`,
  :class:`Always`, :class:`Budget`, and :func:`compression_report` (gradient-coherent strong
  L1/L2 regularisation, arXiv 1811.08056); :func:`shrink` (remove dead units: a smaller dense
  model) and :func:`save_sparse`/:func:`load_sparse` (a compact checkpoint) to ship the result
"""

from torch_recal import functional, models
from torch_recal._compile import compile_enabled, set_compile
from torch_recal.calibration import ResponseCalibration
from torch_recal.coherent import CoherentStrongReg, CompressionReport, compression_report
from torch_recal.criteria import Always, Budget, DescentGate, RatioRule
from torch_recal.generative import (
    FilterStats,
    GenerativeGradientLoss,
    ReferenceDecoder,
    first_layer_filter_stats,
)
from torch_recal.layer_sampling import RandomLayerTraining
from torch_recal.refit import RefitResult, pinv_refit_dense
from torch_recal.ridge import NormalEquations
from torch_recal.rifle import RifleScheduler, find_classifier
from torch_recal.shrink import ShrinkReport, shrink
from torch_recal.sparse_io import load_sparse, save_sparse
from torch_recal.surgery import calibrate, is_calibrated, register_block, uncalibrate

__version__ = "0.1.0"

__all__ = [
    "Always",
    "Budget",
    "CoherentStrongReg",
    "CompressionReport",
    "DescentGate",
    "FilterStats",
    "GenerativeGradientLoss",
    "NormalEquations",
    "RandomLayerTraining",
    "RatioRule",
    "ReferenceDecoder",
    "RefitResult",
    "ResponseCalibration",
    "RifleScheduler",
    "ShrinkReport",
    "__version__",
    "calibrate",
    "compile_enabled",
    "compression_report",
    "find_classifier",
    "first_layer_filter_stats",
    "functional",
    "is_calibrated",
    "load_sparse",
    "models",
    "pinv_refit_dense",
    "register_block",
    "save_sparse",
    "set_compile",
    "shrink",
    "uncalibrate",
]
