"""The Ray Data catalog pipeline: plan from manifests, read, upscale in an actor pool, write outputs and manifests.

Entry point: ``jobs/upscale_catalog.py``; the job itself is ``pipeline.run.run_job``.
"""
