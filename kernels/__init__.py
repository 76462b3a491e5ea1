"""fastdiff's Triton kernels, shipped as ``fastdiff.kernels``.

One fused op per file (kernel + launcher). Import them through ``fastdiff.ops`` only; inside this
package use relative imports. Never ``import kernels``: the folder is the ``fastdiff.kernels``
package, not a top-level module.
"""
