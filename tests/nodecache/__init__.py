"""Tests: nodecache."""
