"""defer: cut a DNN into cost-balanced ONNX stages and pipeline them across edge nodes.

The compiler (`defer.compiler`) writes bundles + a manifest; the runtime (`defer.runtime`) serves
one bundle per node and streams inputs through the chain.
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["Dispatcher", "__version__", "compile_model"]


def __getattr__(name: str):
    # Lazy so `import defer` stays cheap on an edge node (no compiler, no TensorFlow).
    if name == "Dispatcher":
        from defer.runtime.dispatcher import Dispatcher

        return Dispatcher
    if name == "compile_model":
        from defer.compiler import compile_model

        return compile_model
    raise AttributeError(f"module 'defer' has no attribute {name!r}")
