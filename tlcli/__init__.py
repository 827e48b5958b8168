"""tlcli: transfer learning from the shell."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ["KERAS_BACKEND"] = "tensorflow"  # tlcli is TensorFlow code, whatever the shell says; before keras loads

__version__ = "0.1.0"
