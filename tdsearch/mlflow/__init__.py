"""MLflow tracking of searches: parent and nested trial runs, Pareto artifacts, export.

Inside this sub-package ``import mlflow`` is the MLflow library (absolute imports).
"""
