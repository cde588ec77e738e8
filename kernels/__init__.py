"""Triton kernels, installed as ``ddiff.kernels``. Import lazily: triton may be absent."""
