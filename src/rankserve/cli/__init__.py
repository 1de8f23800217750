"""The ``rankserve`` command line."""
