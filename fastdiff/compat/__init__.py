"""Adapters that put fastdiff's fused ops inside other libraries' pipelines.

* ``fastdiff.compat.diffusers``: drop-in schedulers, an attention processor and ``accelerate(pipe)``
  for diffusers pipelines and models.

Each adapter imports its library when it is imported itself, never before: ``import fastdiff`` (and
``import fastdiff.compat``) imports none of them, so the libraries stay optional extras.
"""
