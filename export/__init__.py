"""edgeclf.export: the workstation side of the bundle contract (ONNX export, parity, bundle writing)."""
from edgeclf.export.bundle_writer import ExportConfig, export_bundle
from edgeclf.export.onnx_export import ExportError, export_onnx, parity_report

__all__ = ["ExportConfig", "ExportError", "export_bundle", "export_onnx", "parity_report"]
