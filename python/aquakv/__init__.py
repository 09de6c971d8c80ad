"""aquakv: KV-cache and weight compression (AQUA-KV, HIGGS) with CPU and CUDA kernels."""
from aquakv import _C  # noqa: F401  (loads the compiled library: registers torch.ops.aquakv.*)

__version__ = _C.__version__
