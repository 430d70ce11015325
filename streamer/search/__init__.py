"""The reference index: store (manifest, vector table, FAISS file), FAISS types, search."""
