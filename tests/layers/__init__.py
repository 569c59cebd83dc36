"""Tests: layers."""
