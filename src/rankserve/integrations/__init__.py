"""Adapters that bring rankserve's policies and predictors into other serving engines (vLLM)."""
