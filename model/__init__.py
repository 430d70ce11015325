"""coverwatch's model side (torch): CQT front end, cover encoder, losses, training, ONNX
export, rendered cover-group datasets and held-out evaluation."""
