"""Tests of the MagStack cluster layer."""
