"""Helpers the tests share (no test functions here). Test modules import them as ``support.<module>``
(pytest puts tests/ on the path); tests/conftest.py turns the common ones into fixtures."""
