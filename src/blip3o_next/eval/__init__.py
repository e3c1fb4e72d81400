"""Evaluation: the ShapeWorld verifier (`verifier/`), the GenEval- and ImgEdit-style scorers, and the suites."""
