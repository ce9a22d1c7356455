"""The ``tive`` command: its commands and options, built from the stages' settings."""
