"""The ``signet`` command line."""
