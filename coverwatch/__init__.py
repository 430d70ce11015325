"""coverwatch: live cover-song identification.

One import name for the whole project. The source tree keeps the product's folders, each
installed as a sub-package (pyproject.toml, `package-dir`):

    coverwatch.streamer       streamer/       the runtime daemon (numpy, onnxruntime, FAISS; no torch)
    coverwatch.index_builder  index_builder/  catalogue -> FAISS inner-product index + manifest
    coverwatch.model          model/          PyTorch training and ONNX export (the `train` extra)
    coverwatch.evaluation     coverwatch/evaluation/  demo, broadcast simulation, stream scoring
    coverwatch.cli            the `coverwatch` command, the only module that imports them all
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("coverwatch")
except PackageNotFoundError:  # a source tree on sys.path without an install
    __version__ = "0+unknown"
