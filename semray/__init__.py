"""semray: denoising SEM images of semiconductor wafers at fab scale on Ray.

Image convention inside the library: ``float32`` arrays in ``[0, 1]``, shape ``(H, W)`` for one image
or ``(N, 1, H, W)`` for a batch. Readers convert from the file's dtype; writers convert back.
"""

__version__ = "0.1.0"
