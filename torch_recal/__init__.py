"""torch-recal: five published training tricks as drop-in pieces for your own PyTorch models.

* :class:`ResponseCalibration`, :func:`calibrate` (ResCNet, arXiv 2411.13582)
* :func:`pinv_refit_dense`, :class:`NormalEquations`, :class:`RandomLayerTraining` (fast
  retraining, arXiv 2008.07387)
"""

from torch_recal import functional, models
from torch_recal._compile import compile_enabled, set_compile
from torch_recal.calibration import ResponseCalibration
from torch_recal.refit import NormalEquations, RandomLayerTraining, RefitResult, pinv_refit_dense
from torch_recal.surgery import calibrate, is_calibrated, register_block, uncalibrate

__version__ = "0.1.0"

__all__ = [
    "NormalEquations",
    "RandomLayerTraining",
    "RefitResult",
    "ResponseCalibration",
    "__version__",
    "calibrate",
    "compile_enabled",
    "functional",
    "is_calibrated",
    "models",
    "pinv_refit_dense",
    "register_block",
    "set_compile",
    "uncalibrate",
]
