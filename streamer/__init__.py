"""coverwatch's runtime daemon, in the order the audio flows:

    sources/   file, microphone and Kafka audio in (and the chunk wire format, `publish`)
    frontend/  decode + resample to 22050 Hz mono, incremental CQT, frame ring buffer
    embed/     the ONNX encoder and its model folder
    search/    the index store and its FAISS types, whole-file identification
    decide/    alignment check, calibration statistics, hysteresis
    sinks/     match events to stdout, a file or Kafka
    service/   the daemon: per-stream pipeline, metrics, systemd notify, Kafka checkpoints

Needs numpy, onnxruntime and FAISS; never torch, and never coverwatch.model.
"""
