"""chartsum: discharge and longitudinal summaries of hospital charts, on premises."""

__version__ = "0.1.0"
