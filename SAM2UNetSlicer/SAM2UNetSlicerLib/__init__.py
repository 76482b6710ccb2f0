"""Logic of the SAM2UNetSlicer module.

Nothing in this package imports ``slicer``, ``qt`` or ``vtk``: the Slicer objects it needs
are injected, so plain pytest runs it with small fakes (see ``Testing/test_slicer_*.py``).
"""
