"""Triton kernels of sparsefl (installed as sparsefl.triton_kernels).

GPU path that is easy to read and tune; tested on CPU under TRITON_INTERPRET=1.
"""
