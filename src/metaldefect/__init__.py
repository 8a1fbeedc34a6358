"""metaldefect: find and locate defects on metal surface images."""

__version__ = "0.1.0"

__all__ = ["Detector", "__version__"]


def __getattr__(name: str):
    # Detector pulls in torch and timm; importing it only on first use keeps `import metaldefect` cheap.
    if name == "Detector":
        from metaldefect.inference.detector import Detector

        return Detector
    raise AttributeError(f"module 'metaldefect' has no attribute {name!r}")
