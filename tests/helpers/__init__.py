"""Test helpers shared by several test layers (import as `tests.helpers.<module>`)."""
