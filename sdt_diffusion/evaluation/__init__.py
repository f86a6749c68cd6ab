"""Evaluation: distributed FID-50K sampling from pipeline folders (``sampling``) and the ADM metrics
(``metrics``).  It reads pipelines, never training internals."""
