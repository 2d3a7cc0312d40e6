"""The optional compiled kernels of ingest (pipeline/_scan.c); everything else is in
pyproject.toml. Where no C compiler is found the build goes on without them and ingest uses
their numpy twins (same outputs, slower)."""

from setuptools import Extension, setup

setup(ext_modules=[Extension("pipeline._scan", ["pipeline/_scan.c"], optional=True,
                             extra_compile_args=["-O3"])])
