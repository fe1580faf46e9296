"""torch-recal: five published training tricks as drop-in pieces for your own PyTorch models.

* :class:`ResponseCalibration`, :func:`calibrate` (ResCNet, arXiv 2411.13582)
* :class:`CoherentStrongReg`, :func:`compression_report` (gradient-coherent strong L1/L2
  regularisation, arXiv 1811.08056)
"""

from torch_recal import functional, models
from torch_recal._compile import compile_enabled, set_compile
from torch_recal.calibration import ResponseCalibration
from torch_recal.coherent import CoherentStrongReg, CompressionReport, compression_report
from torch_recal.surgery import calibrate, is_calibrated, register_block, uncalibrate

__version__ = "0.1.0"

__all__ = [
    "CoherentStrongReg",
    "CompressionReport",
    "ResponseCalibration",
    "__version__",
    "calibrate",
    "compile_enabled",
    "compression_report",
    "functional",
    "is_calibrated",
    "models",
    "register_block",
    "set_compile",
    "uncalibrate",
]
