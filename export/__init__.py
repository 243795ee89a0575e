"""edgeclf.export: the workstation side of the bundle contract (ONNX export, parity, bundle writing)."""
