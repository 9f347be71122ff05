"""The test and bench harness (not shipped)."""
