"""Reference catalog -> FAISS inner-product index + manifest (build, add, info, calibration)."""
