"""Triton's stock example models as python-backend classes (YAMLs in ``conf/models/``).

Each class implements the contract of :mod:`pagedserve_plugins.python_backend`; the I/O names, types
and arithmetic follow the models that Triton's example clients expect.
"""
