"""Support code shared by the tests (``from support.catalog import job_config``): pytest puts ``tests/`` on
``sys.path`` (``pythonpath`` in pyproject.toml), and the catalog conftest adds it to ``PYTHONPATH`` so that Ray
workers and job subprocesses import the plug-in engines in ``support.engines`` too."""
