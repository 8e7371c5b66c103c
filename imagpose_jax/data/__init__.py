"""Data: pose renderings (``pose``), dataset index readers (``index``), the grain training and
evaluation pipeline (``pipeline``) and a procedural synthetic dataset (``synthetic``)."""
