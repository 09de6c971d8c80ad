"""aquakv: KV-cache and weight compression (AQUA-KV, HIGGS) with CPU and CUDA kernels."""
import torch  # noqa: F401  (must load libtorch before the extension that links against it)

from aquakv import _C  # noqa: F401  (loads the compiled library: registers torch.ops.aquakv.*)

__version__ = _C.__version__
