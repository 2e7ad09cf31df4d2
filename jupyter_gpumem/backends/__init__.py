"""Backends: the only code that imports torch (``_torch``) and pynvml (``_nvml``), lazily.

``simulated`` is a GPU of any size that lives on the CPU, with the same readings as a real one.
"""
