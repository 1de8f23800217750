"""rankserve: an LLM serving scheduler that ranks requests by predicted output length."""

__version__ = "0.1.0"
