"""Triton kernels of microdit (installed as `microdit.kernels`)."""

if __name__ == "kernels":
    # This folder is the package `microdit.kernels`. With the checkout's root on sys.path
    # (`python -m microdit.cli` run from it, pytest's `pythonpath = .`) it is also found as a
    # top-level `kernels`, which would shadow the PyPI package of that name: transformers >= 5
    # imports `kernels` (Hugging Face's hub kernels) and then fails on our module. Hand over to
    # the real one, found on sys.path without the checkout's root, or fail as a missing module.
    import importlib.machinery
    import importlib.util
    import os
    import sys

    _root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    _path = [p for p in sys.path if os.path.abspath(p or os.curdir) != _root]
    _spec = importlib.machinery.PathFinder.find_spec("kernels", _path)
    if _spec is None or _spec.loader is None:
        del sys.modules["kernels"]
        raise ModuleNotFoundError("No module named 'kernels' (the checkout's kernels/ folder is microdit.kernels)",
                                  name="kernels")
    _module = importlib.util.module_from_spec(_spec)
    sys.modules["kernels"] = _module
    _spec.loader.exec_module(_module)
