"""coverwatch's daemon: sources, rolling CQT, ONNX embedding, FAISS search, match decisions,
sinks and the `coverwatch` command line. Needs no torch."""
