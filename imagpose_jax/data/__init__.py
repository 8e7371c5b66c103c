"""Data: pose renderings (``pose``), dataset index readers (``index``), the check that every file of an index
reads (``check``), the grain training and evaluation pipeline (``pipeline``) and a procedural synthetic dataset
(``synthetic``)."""
