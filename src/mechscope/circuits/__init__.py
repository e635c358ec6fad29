"""Circuits: activation and attribution patching, head detectors, lenses, circuit discovery."""
