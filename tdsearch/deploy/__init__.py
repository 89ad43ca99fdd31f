"""Deployment of a compact model: ONNX export, its check in ONNX Runtime, and latency."""

from tdsearch.deploy.onnx import (
    Latency,
    deployment_latency,
    example_input,
    export_onnx,
    format_latency,
)

__all__ = ["Latency", "deployment_latency", "example_input", "export_onnx", "format_latency"]
