"""Test support shared by tests/, bench/ and tests/e2e_docker/; needs the test extras.

Kept out of the `selflearn` package so that the package imports without them (tests/test_packaging.py).
"""
