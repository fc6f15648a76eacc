"""Galaxy: collaborative transformer inference across heterogeneous edge devices."""

__version__ = "0.1.0"
