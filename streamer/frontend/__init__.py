"""Decoding, resampling to 22050 Hz mono and the incremental CQT into a per-stream ring buffer."""
