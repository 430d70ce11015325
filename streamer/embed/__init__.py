"""The ONNX encoder (CQT frames -> 512-d L2 vectors) and the model folder it loads."""
