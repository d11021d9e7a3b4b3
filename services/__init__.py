"""The serving commands of ``hybrid-sd``: ``serve edge|gateway|cloud`` and ``cluster up``. They start the
worker packages, which the library never imports; registered through the ``hybrid_sd.commands`` entry point.

Not named ``serving``: ``tests/serving.py`` and ``benchmarks/serving.py`` come first on their own path."""
