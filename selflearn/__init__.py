"""selflearn: a chatbot that keeps learning."""

__version__ = "0.1.0"
