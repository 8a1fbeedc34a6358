"""metaldefect: find and locate defects on metal surface images."""

__version__ = "0.1.0"
