"""Tests: csi."""
